"""The optimizer's parts that the CLI test does not pin down: what stays float, and failing variants."""

from __future__ import annotations

from pathlib import Path

import onnx

from model_registry.optimize import float_head_nodes, optimize


def test_int8_static_keeps_the_decode_tail_and_the_last_head_convs_float(fp32_model: Path) -> None:
    graph = onnx.load(str(fp32_model)).graph
    by_name = {node.name: node for node in graph.node}

    kept_float = set(float_head_nodes(graph))

    output_producers = {n.name for n in graph.node if set(n.output) & {o.name for o in graph.output}}
    assert output_producers <= kept_float
    float_convs = {name for name in kept_float if by_name[name].op_type == "Conv"}
    assert "/model.22/dfl/conv/Conv" in float_convs
    assert {f"/model.22/cv2.{i}/cv2.{i}.2/Conv" for i in range(3)} <= float_convs
    assert {f"/model.22/cv3.{i}/cv3.{i}.2/Conv" for i in range(3)} <= float_convs
    # Only the Detect head (module 22) stays float; the backbone and neck are quantized.
    assert all(name.startswith("/model.22/") for name in kept_float)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(float_convs) < len(convs) / 4
    # With depth 0 only Convs with nothing after them (class logits, DFL) stay float.
    assert {n for n in float_head_nodes(graph, 0) if by_name[n].op_type == "Conv"} < float_convs


def test_a_variant_that_cannot_load_is_reported_and_the_rest_go_on(
    int8_model: Path, coco128_yaml: Path, tmp_path: Path
) -> None:
    # fp16 conversion of a dynamically quantized graph feeds float16 into DynamicQuantizeLinear,
    # which onnxruntime refuses to load.
    report = optimize(
        int8_model, coco128_yaml, tmp_path, limit=2, timing_runs=2, variants=("fp16", "int8-dynamic")
    )

    rows = {row.variant: row for row in report.rows}
    assert list(rows) == ["int8", "fp16", "int8-dynamic"]
    assert rows["fp16"].error is not None
    assert "does not load" in rows["fp16"].error
    assert rows["fp16"].latency_ms is None
    assert rows["int8-dynamic"].ok
    assert rows["int8"].ok
    assert rows["int8"].ratio == 1.0
    assert rows["int8-dynamic"].map50_95 is not None
    assert rows["int8-dynamic"].map50_95 > 0
