"""The dashboard's pages: server-rendered HTML over the same core as the REST API.

Sign-in and CSRF: see `fleet_manager.web.session`. Reading needs the viewer role; creating and steering
rollouts the operator role, enforced here on every POST (viewers get no buttons, and 403 if they try).
Pages with a live part render it from a partial template; `?partial=1` returns only that part, which
static/dashboard.js polls and swaps in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment
from sqlalchemy.orm import Session

from fleet_manager import audit
from fleet_manager.devices import (
    DeviceFilter,
    DeviceNotFoundError,
    fleet_summary,
    get_crop,
    get_device,
    list_devices,
    ota_history,
    recent_detections,
    telemetry_history,
)
from fleet_manager.models import DevicePhase, Role, RolloutState
from fleet_manager.registry import RegistryUnavailableError
from fleet_manager.rollouts import (
    RolloutConflictError,
    RolloutController,
    RolloutError,
    RolloutNotFoundError,
    RolloutStateError,
)
from fleet_manager.service import FleetService
from fleet_manager.tokens import authenticate
from fleet_manager.web import queries
from fleet_manager.web.charts import Segment, Series, histogram, line_chart, stacked_bar
from fleet_manager.web.forms import FormError, RolloutForm
from fleet_manager.web.session import (
    CSRF_FIELD,
    WebUser,
    clear_session_cookie,
    current_user,
    new_cookie_value,
    same_origin,
    set_session_cookie,
    valid_csrf,
)
from fleet_manager.web.templating import make_environment, static_dir

PAGE_SIZE = 100
ROLLOUT_DEVICES_SHOWN = 500
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
ACTIONS = ("pause", "resume", "abort", "rollback")
# How each device phase shows in a wave's bar, in bar order: (label, css class).
PHASE_STYLE: dict[str, tuple[str, str]] = {
    "proven": ("proven", "ph-proven"),
    DevicePhase.ACTIVE.value: ("active, in probation", "ph-active"),
    DevicePhase.SENT.value: ("installing", "ph-sent"),
    DevicePhase.QUEUED.value: ("queued", "ph-queued"),
    DevicePhase.WAITING.value: ("waiting", "ph-waiting"),
    DevicePhase.FAILED.value: ("failed", "ph-failed"),
    DevicePhase.UNHEALTHY.value: ("unhealthy", "ph-unhealthy"),
    DevicePhase.CANCELLED.value: ("cancelled", "ph-cancelled"),
    DevicePhase.REVERTING.value: ("reverting", "ph-reverting"),
    DevicePhase.REVERTED.value: ("reverted", "ph-reverted"),
}

router = APIRouter(include_in_schema=False)


# ---- plumbing -----------------------------------------------------------------------------------------


class LoginRequiredError(Exception):
    """No valid session: pages redirect to the sign-in page, scripts get 401."""


class DashboardError(Exception):
    """An error page (or, for scripts, JSON) with this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Dashboard:
    """Per-app dashboard state: the template environment and the registry cache."""

    env: Environment
    registry: queries.RegistryBrowser


def mount(app: FastAPI) -> None:
    """Serve the dashboard from `app` (its `state.fleet` must be the FleetService)."""
    service: FleetService = app.state.fleet

    def fallback() -> Any:
        from model_registry.config import RegistrySettings
        from model_registry.registry import ModelRegistry

        return ModelRegistry(RegistrySettings(**service.settings.registry))

    app.state.dashboard = Dashboard(
        env=make_environment(),
        registry=queries.RegistryBrowser(
            lambda: queries.read_registry(queries.registry_of(service.catalog, fallback))
        ),
    )
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=static_dir()), name="dashboard-static")
    app.add_exception_handler(LoginRequiredError, _login_required)  # type: ignore[arg-type]
    app.add_exception_handler(DashboardError, _dashboard_error)  # type: ignore[arg-type]


def _service(request: Request) -> FleetService:
    service: FleetService = request.app.state.fleet
    return service


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


def _from_script(request: Request) -> bool:
    return request.headers.get("x-requested-with") == "fetch"


def _secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def _render(
    request: Request, template: str, *, user: WebUser | None, status: int = 200, **context: Any
) -> HTMLResponse:
    context.setdefault("nav", "")
    html = _dashboard(request).env.get_template(template).render(request=request, user=user, **context)
    response = HTMLResponse(html, status_code=status)
    _secure(response)
    return response


def _redirect(url: str) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303)
    _secure(response)
    return response


def _safe_next(target: str | None) -> str:
    """Only paths of this site (no scheme, no host, no `//evil`)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target[:500]


def _live_url(request: Request) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "partial"]
    return f"{request.url.path}?{urlencode([*params, ('partial', '1')])}"


async def _login_required(request: Request, error: LoginRequiredError) -> Response:
    if _from_script(request):
        return JSONResponse({"ok": False, "error": "sign in again", "login": "/login"}, status_code=401)
    if request.method == "GET":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return _redirect(f"/login?{urlencode({'next': target})}" if target != "/" else "/login")
    return _redirect("/login")


async def _dashboard_error(request: Request, error: DashboardError) -> Response:
    if _from_script(request):
        return JSONResponse({"ok": False, "error": error.message}, status_code=error.status)
    user = await run_in_threadpool(current_user, request, _service(request).db)
    return _render(
        request, "error.html", user=user, status=error.status, title=f"Error {error.status}", error=error
    )


def page_user(request: Request) -> WebUser:
    user = current_user(request, _service(request).db)
    if user is None:
        raise LoginRequiredError()
    return user


PageUser = Annotated[WebUser, Depends(page_user)]


async def form_data(request: Request) -> dict[str, str]:
    """The posted form (fields with text values only), refused when the browser says it is cross-site."""
    if not same_origin(request, _service(request).settings.api.public_url):
        raise DashboardError(403, "cross-site request refused")
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


FormDep = Annotated[dict[str, str], Depends(form_data)]


@dataclass(frozen=True)
class Action:
    user: WebUser
    form: dict[str, str]


async def action_request(request: Request, form: FormDep) -> Action:
    """A signed-in user's POST carrying this sign-in's CSRF token."""
    user = await run_in_threadpool(current_user, request, _service(request).db)
    if user is None:
        raise LoginRequiredError()
    if not valid_csrf(user, form.get(CSRF_FIELD)):
        raise DashboardError(403, "missing or stale CSRF token: reload the page and try again")
    return Action(user, form)


ActionDep = Annotated[Action, Depends(action_request)]


def _require_operator(user: WebUser) -> None:
    if not user.can(Role.OPERATOR):
        raise DashboardError(403, f"this needs the operator role; your token has {user.role}")


# ---- sign-in ------------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    if current_user(request, _service(request).db) is not None:
        return _redirect(_safe_next(next))
    return _render(request, "login.html", user=None, title="Sign in", next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, form: FormDep) -> Response:
    token = form.get("token", "").strip()
    target = _safe_next(form.get("next"))
    service = _service(request)
    with service.db.read() as session:
        principal = authenticate(session, token)
    if principal is None or principal.role is Role.DEVICE:
        error, status = (
            ("That token is unknown or revoked.", 401)
            if principal is None
            else ("Device tokens cannot sign in to the dashboard.", 403)
        )
        return _render(
            request, "login.html", user=None, title="Sign in", next=target, error=error, status=status
        )
    with service.db.write() as session:
        audit.record(session, principal.actor, "dashboard.login", "token", str(principal.token_id))
    response = _redirect(target)
    set_session_cookie(request, response, new_cookie_value(token))
    return response


@router.post("/logout")
def logout(request: Request, form: FormDep) -> Response:
    user = current_user(request, _service(request).db)
    if user is not None and not valid_csrf(user, form.get(CSRF_FIELD)):
        raise DashboardError(403, "missing or stale CSRF token: reload the page and try again")
    response = _redirect("/login")
    clear_session_cookie(response)
    return response


# ---- overview -----------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, user: PageUser, partial: bool = False) -> Response:
    service = _service(request)
    with service.db.read() as session:
        summary = fleet_summary(session)
        active = queries.rollout_summaries(
            session, queries.list_rollouts(session, active_only=True, limit=20)
        )
        recent = audit.entries(session, limit=8)
        figures = queries.fleet_figures(session)
    total = summary["devices"] or 0
    by_state = summary["by_state"]
    charts = [
        histogram(figures.fps, title="Online devices by throughput", unit="fps", css="s1"),
        histogram(figures.latency_p95_ms, title="Online devices by p95 latency", unit="ms", css="s2"),
    ]
    context: dict[str, Any] = {
        "title": "Overview",
        "nav": "overview",
        "total": total,
        "by_state": by_state,
        "by_model": summary["by_model"],
        "active": [_summary_view(s) for s in active],
        "recent": recent,
        "charts": charts,
        "ingest": service.ingestor.stats.snapshot(),
        "mqtt_connected": None if service.mqtt is None else service.mqtt.connected,
        "live_url": _live_url(request),
    }
    return _render(request, "_overview_live.html" if partial else "overview.html", user=user, **context)


def _summary_view(summary: queries.RolloutSummary) -> dict[str, Any]:
    segments = _segments(summary.phases, summary.proven)
    return {
        "rollout": summary.rollout,
        "summary": summary,
        "bar": stacked_bar(segments, total=summary.total, width=200),
    }


def _segments(phases: Counter[str] | dict[str, int], proven: int) -> list[Segment]:
    counts = dict(phases)
    counts["proven"] = proven
    counts[DevicePhase.ACTIVE.value] = counts.get(DevicePhase.ACTIVE.value, 0) - proven
    return [Segment(label, counts.get(phase, 0), css) for phase, (label, css) in PHASE_STYLE.items()]


# ---- devices ------------------------------------------------------------------------------------------


@router.get("/devices", response_class=HTMLResponse)
def devices_page(
    request: Request,
    user: PageUser,
    group: str | None = None,
    tag: Annotated[list[str] | None, Query()] = None,
    state: str | None = None,
    model: str | None = None,
    q: Annotated[str | None, Query(max_length=64)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    partial: bool = False,
) -> Response:
    tags: dict[str, str] = {}
    problems = []
    for item in tag or []:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            problems.append(f"tag filter {item!r} ignored: write key=value")
            continue
        tags[key] = value
    flt = DeviceFilter(
        group=group or None, tags=tags, state=state or None, model=model or None, search=q or None
    )
    service = _service(request)
    with service.db.read() as session:
        total, rows = list_devices(session, flt, limit=PAGE_SIZE, offset=offset)
        options = queries.filter_options(session) if not partial else None
    base = [(k, v) for k, v in request.query_params.multi_items() if k not in ("offset", "partial")]
    context: dict[str, Any] = {
        "title": "Devices",
        "nav": "devices",
        "devices": rows,
        "total": total,
        "offset": offset,
        "page_size": PAGE_SIZE,
        "prev_url": f"/devices?{urlencode([*base, ('offset', max(0, offset - PAGE_SIZE))])}"
        if offset > 0
        else None,
        "next_url": f"/devices?{urlencode([*base, ('offset', offset + PAGE_SIZE)])}"
        if offset + PAGE_SIZE < total
        else None,
        "filters": {
            "group": group or "",
            "tag": next(iter(tag or []), ""),
            "state": state or "",
            "model": model or "",
            "q": q or "",
        },
        "options": options,
        "problems": problems,
        "live_url": _live_url(request),
    }
    return _render(request, "_devices_live.html" if partial else "devices.html", user=user, **context)


def _device_or_404(session: Session, device_id: str) -> Any:
    try:
        return get_device(session, device_id)
    except DeviceNotFoundError:
        raise DashboardError(404, f"no device {device_id!r}") from None


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, user: PageUser, device_id: str, partial: bool = False) -> Response:
    service = _service(request)
    with service.db.read() as session:
        device = _device_or_404(session, device_id)
        history = telemetry_history(session, device_id, limit=500)
        detections = recent_detections(session, device_id, limit=12)
        ota = ota_history(session, device_id, limit=30)
        rollouts = queries.device_rollouts(session, device_id)
        tags = device.tag_map
    objects = [{"event": view.event, **obj} for view in detections for obj in view.objects][:24]
    charts = [
        line_chart([Series("fps", [(s.ts, s.fps) for s in history], "s1")], title="Throughput", unit="fps"),
        line_chart(
            [
                Series(
                    "p50", [(s.ts, s.latency_p50_ms) for s in history if s.latency_p50_ms is not None], "s3"
                ),
                Series(
                    "p95", [(s.ts, s.latency_p95_ms) for s in history if s.latency_p95_ms is not None], "s2"
                ),
            ],
            title="Latency",
            unit="ms",
        ),
    ]
    context: dict[str, Any] = {
        "title": device.id,
        "nav": "devices",
        "device": device,
        "tags": tags,
        "telemetry": device.telemetry or {},
        "samples": len(history),
        "charts": charts,
        "objects": objects,
        "events": len(detections),
        "ota": ota,
        "rollouts": rollouts,
        "live_url": _live_url(request),
    }
    return _render(request, "_device_live.html" if partial else "device.html", user=user, **context)


@router.get("/crops/{det_id}.jpg")
def crop_image(request: Request, user: PageUser, det_id: str) -> Response:
    with _service(request).db.read() as session:
        row = get_crop(session, det_id)
    if row is None:
        raise DashboardError(404, f"no crop stored for detection {det_id}")
    return Response(
        row.jpeg,
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


# ---- models -------------------------------------------------------------------------------------------


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, user: PageUser, refresh: bool = False, partial: bool = False) -> Response:
    snapshot = _dashboard(request).registry.snapshot(fresh=refresh and not partial)
    with _service(request).db.read() as session:
        summary = fleet_summary(session)
    running = {(m["name"], m["version"]): m["devices"] for m in summary["by_model"] if m["name"]}
    return _render(
        request,
        "_models_live.html" if partial else "models.html",
        user=user,
        title="Models",
        nav="models",
        snapshot=snapshot,
        running=running,
        live_url="/models?partial=1",
    )


# ---- rollouts -----------------------------------------------------------------------------------------


def _rollouts_context(request: Request, user: WebUser, form: RolloutForm | None) -> dict[str, Any]:
    service = _service(request)
    with service.db.read() as session:
        summaries = queries.rollout_summaries(session, queries.list_rollouts(session, limit=50))
        options = queries.filter_options(session) if form is not None else None
    refs: list[str] = []
    registry_error = None
    if form is not None:
        snapshot = _dashboard(request).registry.snapshot(wait_s=1.0)
        refs = [r for m in snapshot.models for r in m.refs]
        registry_error = snapshot.error
    return {
        "title": "Rollouts",
        "nav": "rollouts",
        "rollouts": [_summary_view(s) for s in summaries],
        "form": form,
        "options": options,
        "refs": refs,
        "registry_error": registry_error,
        "error": None,
        "conflicts": {},
        "live_url": f"{request.url.path}?partial=1",
    }


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(
    request: Request, user: PageUser, model: str | None = None, partial: bool = False
) -> Response:
    form = RolloutForm.prefilled(model) if user.can(Role.OPERATOR) and not partial else None
    context = _rollouts_context(request, user, form)
    return _render(request, "_rollouts_live.html" if partial else "rollouts.html", user=user, **context)


@router.post("/rollouts", response_class=HTMLResponse)
def create_rollout(request: Request, action: ActionDep) -> Response:
    _require_operator(action.user)
    form = RolloutForm.of(action.form)
    status, error, conflicts = 422, "", {}
    try:
        rollout = _service(request).controller.create(form.spec(), action.user.actor)
        return _redirect(f"/rollouts/{rollout.id}")
    except FormError as exc:
        error = str(exc)
    except RolloutConflictError as exc:
        status, error, conflicts = 409, str(exc), exc.conflicts
    except RolloutError as exc:
        error = str(exc)
    except RegistryUnavailableError as exc:
        status, error = 503, str(exc)
    context = _rollouts_context(request, action.user, form)
    context.update(error=error, conflicts=dict(list(conflicts.items())[:50]))
    return _render(request, "rollouts.html", user=action.user, status=status, **context)


def _actions_for(state: str) -> list[str]:
    actions = []
    if state in (RolloutState.PENDING.value, RolloutState.RUNNING.value):
        actions.append("pause")
    if state == RolloutState.PAUSED.value:
        actions.append("resume")
    if state in {s.value for s in (RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED)}:
        actions.append("abort")
    if state != RolloutState.ROLLED_BACK.value:
        actions.append("rollback")
    return actions


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(request: Request, user: PageUser, rollout_id: str, partial: bool = False) -> Response:
    service = _service(request)
    try:
        rollout, rows = service.controller.get(rollout_id)
    except RolloutNotFoundError:
        raise DashboardError(404, f"no rollout {rollout_id!r}") from None
    with service.db.read() as session:
        timeline = audit.entries(session, target_type="rollout", target_id=rollout_id, limit=50)
    waves = []
    for wave in RolloutController.progress(rollout, rows):
        segments = _segments(wave.phases, wave.proven)
        waves.append(
            {
                "wave": wave,
                "bar": stacked_bar(segments, total=wave.devices, width=360),
                "current": rollout.state_enum.active and wave.index == rollout.current_wave,
                "phases": {s.label: s.count for s in segments if s.count},
            }
        )
    context: dict[str, Any] = {
        "title": rollout.id,
        "nav": "rollouts",
        "rollout": rollout,
        "waves": waves,
        "devices": rows[:ROLLOUT_DEVICES_SHOWN],
        "hidden_devices": max(0, len(rows) - ROLLOUT_DEVICES_SHOWN),
        "legend": list(PHASE_STYLE.values()),
        "actions": _actions_for(rollout.state) if user.can(Role.OPERATOR) else [],
        "timeline": timeline,
        "live_url": _live_url(request),
    }
    return _render(request, "_rollout_live.html" if partial else "rollout.html", user=user, **context)


@router.post("/rollouts/{rollout_id}/{verb}")
def rollout_action(request: Request, action: ActionDep, rollout_id: str, verb: str) -> Response:
    if verb not in ACTIONS:
        raise DashboardError(404, f"no rollout action {verb!r} (use {', '.join(ACTIONS)})")
    _require_operator(action.user)
    controller = _service(request).controller
    reason = (action.form.get("reason") or "").strip()[:500] or None
    actor = action.user.actor
    try:
        if verb == "pause":
            rollout = controller.pause(rollout_id, actor, reason)
        elif verb == "resume":
            rollout = controller.resume(rollout_id, actor)
        elif verb == "abort":
            rollout = controller.abort(rollout_id, actor, reason)
        else:
            rollout = controller.rollback(rollout_id, actor, reason)
    except RolloutNotFoundError:
        raise DashboardError(404, f"no rollout {rollout_id!r}") from None
    except RolloutStateError as error:
        raise DashboardError(409, str(error)) from None
    except RegistryUnavailableError as error:
        raise DashboardError(503, str(error)) from None
    if _from_script(request):
        done = {"pause": "Paused", "resume": "Resumed", "abort": "Aborted", "rollback": "Rolled back"}[verb]
        message = f"{done} {rollout.id}: it is {rollout.state.replace('_', ' ')} now"
        return JSONResponse({"ok": True, "state": rollout.state, "message": message})
    return _redirect(f"/rollouts/{rollout_id}")
