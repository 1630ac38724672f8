"""`edgefleet registry ...`: keys, registering, aliases, downloads and variant optimization.

Heavy modules (mlflow, onnx, onnxruntime) load inside the commands: the `edgefleet` root command imports
this module for every sub-command, so it has to stay light.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from model_registry.config import RegistrySettings

if TYPE_CHECKING:
    from model_registry.optimize import OptimizeReport, VariantResult
    from model_registry.registry import ModelRegistry, ModelVersionInfo

registry_app = typer.Typer(
    help="The model registry: versioned, signed ONNX models on MLflow.", no_args_is_help=True
)
stderr = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)

ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who does this, for the audit trail; default: your user name.")
]
KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="PEM Ed25519 private key; default: EDGEFLEET_REGISTRY_SIGNING_KEY, $EDGEFLEET_SIGNING_KEY, "
        "else <data_dir>/keys/signing.pem.",
    ),
]
UnsignedOption = Annotated[
    bool,
    typer.Option("--unsigned", help="Register without a signature (development only: devices refuse it)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _fail(message: str, code: int = 2) -> NoReturn:
    stderr.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


@registry_app.callback()
def _options(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Registry data folder (env EDGEFLEET_REGISTRY_DATA_DIR).")
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (env EDGEFLEET_REGISTRY_MLFLOW_URI); default: local SQLite."),
    ] = None,
) -> None:
    """Settings come from EDGEFLEET_REGISTRY_* environment variables; these options override them."""
    ctx.obj = {key: value for key, value in {"data_dir": data_dir, "mlflow_uri": mlflow_uri}.items() if value}


def _settings(ctx: typer.Context) -> RegistrySettings:
    from pydantic import ValidationError

    try:
        return RegistrySettings(**(ctx.obj or {}))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        _fail(f"invalid registry settings ({problems}); check the EDGEFLEET_REGISTRY_* variables")


def _registry(ctx: typer.Context) -> ModelRegistry:
    from model_registry.registry import ModelRegistry

    # MLflow announces its database migrations at INFO when it is imported; users need not see them.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return ModelRegistry(_settings(ctx))


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def _run(action: Any) -> Any:
    """Run `action()`, turning the registry's errors into messages and exit codes."""
    from mlflow.exceptions import MlflowException

    from device_agent.dataset import DatasetError
    from fleet_protocol.signing import SigningError
    from model_registry.optimize import OptimizeError
    from model_registry.registry import IntegrityError, RegistryError
    from model_registry.validation import ModelValidationError

    try:
        return action()
    except IntegrityError as error:
        _fail(str(error), code=1)
    except (
        CliError,
        RegistryError,
        ModelValidationError,
        SigningError,
        DatasetError,
        OptimizeError,
    ) as error:
        _fail(str(error))
    except MlflowException as error:
        _fail(
            f"MLflow refused or could not be reached: {error.message} — check mlflow_uri "
            "(EDGEFLEET_REGISTRY_MLFLOW_URI) and that the tracking server is up"
        )


def _split_ref(ref: str, version: str | None) -> tuple[str, str | None, str | None]:
    """`NAME VERSION` or `NAME@ALIAS` → (name, version, alias)."""
    if "@" in ref:
        if version is not None:
            raise CliError(f"give either NAME@ALIAS or NAME VERSION, not both ({ref} {version})")
        name, alias = ref.rsplit("@", 1)
        if not name or not alias:
            raise CliError(f"{ref!r}: expected NAME@ALIAS, e.g. yolov8n@production")
        return name, None, alias
    if version is None:
        raise CliError(f"which version of {ref}? give NAME VERSION (e.g. {ref} 3) or NAME@ALIAS")
    return ref, version, None


def _lookup(registry: ModelRegistry, ref: str, version: str | None) -> ModelVersionInfo:
    name, number, alias = _split_ref(ref, version)
    return registry.resolve(name, alias) if alias is not None else registry.get(name, number or "")


def _parse_tags(tags: list[str]) -> dict[str, str]:
    parsed = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--tag {item!r}: expected KEY=VALUE")
        parsed[key.strip()] = value
    return parsed


def _version_table(info: ModelVersionInfo) -> Table:
    table = Table(title=f"{info.name} version {info.version}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = {
        "aliases": ", ".join(info.aliases) or "-",
        "variant": info.variant,
        "precision": info.precision,
        "sha256": info.sha256,
        "size": f"{info.size:,} bytes",
        "input shape": str(list(info.input_shape)),
        "class names digest": info.class_names_digest,
        "signature": info.signature or "[yellow]unsigned[/yellow]",
        "signing key id": info.signing_key_id or "-",
        "created": info.created_at.isoformat(timespec="seconds"),
        "source": info.source,
    }
    for key, value in rows.items():
        table.add_row(key, value)
    shown = {"sha256", "size", "variant", "precision", "input_shape", "class_names_digest", "signature"}
    shown |= {"signing_key_id"}
    for key, value in sorted(info.tags.items()):
        if key not in shown:
            table.add_row(key, value)
    return table


# -- keys ----------------------------------------------------------------------------------------


@registry_app.command("keygen")
def keygen_command(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Private key file to write; default: <data_dir>/keys/signing.pem."),
    ] = None,
) -> None:
    """Create the Ed25519 key pair that signs model versions (private 0600, public beside it as .pub)."""
    from fleet_protocol.signing import generate_keypair, key_id, load_public_key

    private_path = out or _settings(ctx).default_key_path
    public_path = private_path.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            _fail(
                f"{path} exists; keygen never overwrites a key. Choose another --out, or move it away first"
            )
    private_pem, public_pem = generate_keypair()
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as error:
        _fail(f"cannot write the key pair: {error}")
    kid = key_id(load_public_key(public_pem, str(public_path)))
    stdout.print(f"private key: {private_path} (mode 0600; keep it secret, never commit it)", highlight=False)
    stdout.print(f"public key:  {public_path} (key id {kid})", highlight=False)
    stdout.print("Copy the public key into every device's trust store folder.", highlight=False)


# -- versions ------------------------------------------------------------------------------------


@registry_app.command("register")
def register_command(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="ONNX model file (detector or classifier).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Registered model name, e.g. yolov8n.")],
    alias: Annotated[str | None, typer.Option(help="Point this alias at the new version.")] = None,
    variant: Annotated[
        str | None, typer.Option(help="Build variant, e.g. fp32, fp16, int8; default: the precision.")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Extra tag KEY=VALUE (repeatable).")] = None,
    key: KeyOption = None,
    unsigned: UnsignedOption = False,
    actor: ActorOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate an ONNX model, store it in MLflow as a new signed version, and tag it with its facts."""
    if not model.is_file():
        _fail(f"model file not found: {model}")
    if key is not None and unsigned:
        _fail("--key and --unsigned contradict each other; give one")
    registry = _registry(ctx)
    info: ModelVersionInfo = _run(
        lambda: registry.register(
            model,
            name,
            alias=alias,
            variant=variant,
            signing_key=key,
            extra_tags=_parse_tags(tag or []),
            actor=_actor(actor),
            unsigned=unsigned,
        )
    )
    if as_json:
        sys.stdout.write(json.dumps(info.to_dict(), indent=2) + "\n")
    else:
        stdout.print(_version_table(info))
    if info.signature is None:
        stderr.print("[yellow]warning:[/yellow] registered unsigned: devices will refuse this version")


@registry_app.command("list")
def list_command(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="List this model's versions instead of all models.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List registered models, or the versions of one model."""
    registry = _registry(ctx)
    if name is None:
        models = _run(registry.list_models)
        if as_json:
            documents = [
                {"name": m.name, "latest_version": m.latest_version, "aliases": m.aliases} for m in models
            ]
            sys.stdout.write(json.dumps(documents, indent=2) + "\n")
            return
        table = Table(title="registered models", title_justify="left")
        for column in ("name", "latest", "aliases", "updated"):
            table.add_column(column)
        for m in models:
            aliases = ", ".join(f"{a}→{v}" for a, v in m.aliases.items()) or "-"
            table.add_row(
                m.name, m.latest_version or "-", aliases, m.updated_at.isoformat(timespec="seconds")
            )
        if not models:
            table.add_row("(none yet: edgefleet registry register MODEL.onnx --name NAME)", "", "", "")
        stdout.print(table)
        return
    versions = _run(lambda: registry.list_versions(name))
    if as_json:
        sys.stdout.write(json.dumps([v.to_dict() for v in versions], indent=2) + "\n")
        return
    table = Table(title=f"versions of {name}", title_justify="left")
    for column in ("version", "aliases", "variant", "precision", "size", "sha256", "signed", "created"):
        table.add_column(column, justify="right" if column in ("version", "size") else "left")
    for v in versions:
        table.add_row(
            v.version,
            ", ".join(v.aliases) or "-",
            v.variant,
            v.precision,
            f"{v.size:,}",
            v.sha256[:12],
            "yes" if v.signature else "[yellow]no[/yellow]",
            v.created_at.isoformat(timespec="seconds"),
        )
    stdout.print(table)


@registry_app.command("show")
def show_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME (with VERSION) or NAME@ALIAS.")],
    version: Annotated[str | None, typer.Argument(help="Version number.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one version with all its tags."""
    registry = _registry(ctx)
    info: ModelVersionInfo = _run(lambda: _lookup(registry, ref, version))
    if as_json:
        sys.stdout.write(json.dumps(info.to_dict(), indent=2) + "\n")
    else:
        stdout.print(_version_table(info))


@registry_app.command("promote")
def promote_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to point the alias at.")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias to move, e.g. production or canary.")],
    actor: ActorOption = None,
) -> None:
    """Point an alias at a version (recorded in the alias history)."""
    registry = _registry(ctx)
    move = _run(lambda: registry.set_alias(name, alias, version, _actor(actor)))
    previous = f"version {move.from_version}" if move.from_version else "nothing"
    stdout.print(
        f"{name}@{alias} → version {move.to_version} (was {previous}; by {move.actor})", highlight=False
    )


@registry_app.command("resolve")
def resolve_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME@ALIAS, e.g. yolov8n@production.")],
) -> None:
    """Print the signed manifest (name, version, sha256, size) and signature an alias points at, as JSON."""
    registry = _registry(ctx)
    if "@" not in ref:
        _fail(f"{ref!r}: expected NAME@ALIAS, e.g. yolov8n@production")
    info: ModelVersionInfo = _run(lambda: _lookup(registry, ref, None))
    sys.stdout.write(json.dumps(info.manifest_document(), indent=2) + "\n")


@registry_app.command("download")
def download_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME (with VERSION) or NAME@ALIAS.")],
    version: Annotated[str | None, typer.Argument(help="Version number.")] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="File to write, or an existing folder to write into.")
    ] = Path("."),
) -> None:
    """Download a version's file, verified against its registered sha256 and size."""
    registry = _registry(ctx)

    def fetch() -> tuple[ModelVersionInfo, Path]:
        info = _lookup(registry, ref, version)
        return info, registry.download(info.name, info.version, output)

    info, path = _run(fetch)
    stdout.print(
        f"{info.name} version {info.version} → {path} ({info.size:,} bytes, sha256 {info.sha256} verified)",
        highlight=False,
    )


@registry_app.command("history")
def history_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: JsonFlag = False,
) -> None:
    """Show every alias move of a model (who, when, from, to), oldest first."""
    registry = _registry(ctx)
    moves = _run(lambda: registry.alias_history(name))
    if as_json:
        sys.stdout.write(json.dumps([m.to_dict() for m in moves], indent=2) + "\n")
        return
    table = Table(title=f"alias history of {name}", title_justify="left")
    for column in ("when (UTC)", "alias", "from", "to", "by"):
        table.add_column(column)
    for m in moves:
        table.add_row(
            m.at.isoformat(timespec="seconds"),
            m.alias,
            m.from_version or "-",
            m.to_version or "(removed)",
            m.actor,
        )
    if not moves:
        table.add_row("(no alias moves yet)", "", "", "", "")
    stdout.print(table)


# -- optimization --------------------------------------------------------------------------------


@registry_app.command("optimize")
def optimize_command(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="fp32 YOLO detector (ONNX) to build variants of.")],
    data: Annotated[Path, typer.Option("--data", help="YOLO data YAML to evaluate on (e.g. coco128.yaml).")],
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate on the first N images only.")] = None,
    calibration: Annotated[
        int, typer.Option(min=1, help="Images that calibrate the static int8 variant.")
    ] = 64,
    calibration_method: Annotated[
        str, typer.Option(help="How int8-static sets activation ranges: percentile, minmax or entropy.")
    ] = "percentile",
    float_head_depth: Annotated[
        int,
        typer.Option(
            min=-1,
            help="int8-static keeps Convs with at most this many Convs after them in float "
            "(-1: only the decode tail; more float = more accurate, slower).",
        ),
    ] = 1,
    runs: Annotated[int, typer.Option(min=1, help="Timed inference runs per variant (median).")] = 30,
    max_map_drop: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Pick the fastest variant losing at most this much mAP50-95."),
    ] = None,
    register: Annotated[
        str | None,
        typer.Option(
            "--register",
            help="Register under this name: the pick with --max-map-drop, else every variant built.",
        ),
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="With --register and --max-map-drop: point this alias at the pick.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the variant files.")] = Path("optimized"),
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    providers: Annotated[
        str | None, typer.Option(help="Execution providers, comma-separated; default: best available.")
    ] = None,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime intra-op threads (0 = its default).")] = 0,
    key: KeyOption = None,
    unsigned: UnsignedOption = False,
    actor: ActorOption = None,
) -> None:
    """Build fp32-optimized, fp16, int8-dynamic and int8-static variants; evaluate, time and compare them."""
    from fleet_protocol.onnx_model import SessionOptions
    from model_registry.optimize import optimize

    if not model.is_file():
        _fail(f"model file not found: {model}")
    if alias is not None and (register is None or max_map_drop is None):
        _fail("--alias needs --register NAME and --max-map-drop (the alias points at the pick)")
    registry = _registry(ctx) if register is not None else None
    if registry is not None and not unsigned:
        _run(lambda: registry.signing_key(key))  # fail now, not after minutes of optimizing
    options = SessionOptions(
        providers=[p.strip() for p in providers.split(",") if p.strip()] if providers else None,
        intra_op_threads=threads,
    )
    with _OptimizeProgress() as progress:
        report: OptimizeReport = _run(
            lambda: optimize(
                model,
                data,
                out,
                limit=limit,
                calibration_images=calibration,
                calibration_method=calibration_method,
                float_conv_depth=float_head_depth,
                timing_runs=runs,
                max_map_drop=max_map_drop,
                session_options=options,
                progress=progress.update,
            )
        )
    stdout.print(_optimize_table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    if max_map_drop is not None and report.pick is None:
        stderr.print(f"[yellow]no variant is within {max_map_drop} mAP50-95 of the source[/yellow]")
    if registry is None:
        return
    chosen = (
        [report.row(report.pick)]
        if max_map_drop is not None and report.pick
        else [row for row in report.rows if row.ok]
    )
    for row in chosen:
        info = _register_variant(registry, report, row, str(register), alias, key, unsigned, _actor(actor))
        pointed = f", {alias} → {info.version}" if alias and row.variant == report.pick else ""
        stdout.print(
            f"registered {info.name} version {info.version} ({row.variant}){pointed}", highlight=False
        )


def _register_variant(
    registry: ModelRegistry,
    report: OptimizeReport,
    row: VariantResult,
    name: str,
    alias: str | None,
    key: Path | None,
    unsigned: bool,
    actor: str,
) -> ModelVersionInfo:
    path = row.path
    if path is None:
        raise CliError(f"variant {row.variant} has no file to register")
    info: ModelVersionInfo = _run(
        lambda: registry.register(
            path,
            name,
            alias=alias if row.variant == report.pick else None,
            variant=row.variant,
            signing_key=key,
            extra_tags=report.tags(row),
            actor=actor,
            unsigned=unsigned,
        )
    )
    return info


class _OptimizeProgress:
    """Rich progress bars, one per stage as `optimize` reports it."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _OptimizeProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            label = {"build": "building variants", "time": "timing"}.get(stage, stage)
            self._tasks[stage] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def _optimize_table(report: OptimizeReport) -> Table:
    table = Table(
        title=f"{report.source.name} on {report.data.name} ({report.images} images; latency: median of "
        f"{report.timing_runs} runs, {', '.join(report.providers)})",
        title_justify="left",
    )
    for column in (
        "variant",
        "precision",
        "size MB",
        "mAP50-95",
        "mAP50",
        "latency ms",
        f"vs {report.baseline.variant}",
    ):
        table.add_column(
            column, justify="left" if column in ("variant", "precision") else "right", no_wrap=True
        )
    table.add_column("note")
    baseline = report.baseline.map50_95
    for row in report.rows:
        picked = row.variant == report.pick
        if row.error is not None:
            table.add_row(row.variant, row.precision or "-", *["-"] * 5, f"[red]{row.error}[/red]")
            continue
        drop = (
            f"Δ {row.map50_95 - baseline:+.4f}"
            if row.map50_95 is not None and baseline is not None and row is not report.baseline
            else "source"
            if row is report.baseline
            else ""
        )
        table.add_row(
            row.variant,
            row.precision,
            f"{(row.size or 0) / 1e6:.2f}",
            _fmt(row.map50_95, 4),
            _fmt(row.map50, 4),
            _fmt(row.latency_ms, 1),
            _fmt(row.ratio, 2),
            drop + ("  [green]✓ pick[/green]" if picked else ""),
            style="bold" if picked else None,
        )
    return table


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
