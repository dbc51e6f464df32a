"""fastcnn-bench: writes its three files, checks outputs before timing, refuses bad arguments."""

from __future__ import annotations

import copy
import json

import pytest

from fastcnn import bench


def test_models_run_writes_json_markdown_and_plot(tmp_path):
    code = bench.main(
        [
            "--model",
            "resnet18",
            "--batch",
            "1,2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--providers",
            "eager,fastcnn",
            "--iters",
            "1",
            "--size",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["measurements"]
    assert {(r["batch"], r["provider"]) for r in rows} == {
        (1, "eager"),
        (2, "eager"),
        (1, "fastcnn"),
        (2, "fastcnn"),
    }
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["max_rel_error"] < 1e-3 for r in rows)
    for key in ("torch", "cpu", "date", "git commit", "command"):
        assert key in data["environment"]
    assert "| resnet18 | 2 | fastcnn |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_op_mode(tmp_path):
    """Every op, each against eager, at GoogLeNet/ResNet sizes (batch 1 keeps it quick)."""
    code = bench.main(
        [
            "--op",
            "all",
            "--batch",
            "1",
            "--device",
            "cpu",
            "--providers",
            "eager,fastcnn-cpu",
            "--iters",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["measurements"]
    assert [(r["model"], r["provider"], r["status"]) for r in rows] == [
        (op, provider, "ok")
        for op in ("add_relu", "conv_bn_act", "inception")
        for provider in ("eager", "fastcnn-cpu")
    ]
    assert all(r["max_rel_error"] < 1e-4 for r in rows)


def test_a_provider_that_cannot_run_is_reported_not_fatal(tmp_path):
    code = bench.main(
        [
            "--model",
            "resnet18",
            "--batch",
            "1",
            "--device",
            "cpu",
            "--providers",
            "eager,fastcnn-cuda",
            "--iters",
            "1",
            "--size",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "results.json").read_text())["measurements"]
    assert rows[1]["status"].startswith("unavailable") and code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "vgg16"], "unknown model 'vgg16'"),
        (["--op", "add_relu,softmax"], "unknown op 'softmax'"),
        (["--providers", "eager,tensorrt"], "unknown provider 'tensorrt'"),
        (["--batch", "1,x"], "--batch must be a comma list of integers"),
        (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *argv] if "--device" not in argv else argv)
    assert message in capsys.readouterr().err


def test_cpu_preset_fills_what_is_not_given():
    args = bench.parse_args(["--preset", "cpu", "--batch", "2"])
    assert args.device == "cpu" and args.threads == 2 and args.dtype == "float32"
    assert args.models == ["resnet50", "googlenet"]
    assert args.provider_list == [
        "eager-cl", "compile", "openvino", "openvino-default", "onnxruntime", "fastcnn-cpu",
    ]  # fmt: skip
    assert args.processes == 3  # each provider in processes of its own
    assert args.batches == [2]  # the explicit argument wins


def test_bf16_precision_compares_a_bf16_model_with_bf16_peers():
    args = bench.parse_args(["--precision", "bf16"])
    assert args.dtype == "bfloat16" and args.device == "cpu"
    assert args.provider_list == [
        "eager-cl", "compile", "openvino-bf16", "openvino-default", "fastcnn-cpu",
    ]  # fmt: skip


def test_fastcnn_rows_compare_with_the_best_peer():
    group = [
        {"provider": "eager-cl", "ms": 4.0},
        {"provider": "jit", "ms": 2.0},
        {"provider": "compile", "status": "failed"},
        {"provider": "fastcnn-cpu", "ms": 2.5},
    ]
    bench._compare_with_best_peer(group)
    assert group[3]["vs_best_peer"] == pytest.approx(0.8)
    assert all("vs_best_peer" not in r for r in group[:3])


def test_interleaved_timing_rotates_the_order_of_providers():
    from fastcnn.bench.results import time_interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(fns, iters=3, warmup=0)
    assert set(times) == {"a", "b", "c"} and all(ms >= 0 for ms in times.values())
    assert calls == list("abcbcacab")  # each provider leads one round


def test_each_provider_in_processes_of_its_own(tmp_path):
    """--processes: every (model, provider) runs in fresh processes; rows carry each process's
    median and the CPU time a call."""
    code = bench.main(
        [
            "--model", "resnet18", "--batch", "1,2", "--device", "cpu", "--size", "32",
            "--providers", "eager,fastcnn-cpu", "--iters", "2", "--threads", "1",
            "--processes", "2", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["measurements"]
    assert [(r["batch"], r["provider"]) for r in rows] == [
        (1, "eager"), (1, "fastcnn-cpu"), (2, "eager"), (2, "fastcnn-cpu"),
    ]  # fmt: skip
    for r in rows:
        assert r["status"] == "ok" and len(r["process_ms"]) == 2 and r["cpu_ms"] > 0
        assert r["max_rel_error"] < 1e-3
    assert rows[1]["vs_best_peer"] > 0 and "OMP_WAIT_POLICY" in data["environment"]


def test_a_worker_that_fails_is_reported_per_batch():
    from fastcnn.bench.isolated import Job, run_in_processes

    rows = run_in_processes([Job("resnet18", "fastcnn-cuda", [1], size=32, iters=1)], rounds=1)
    assert rows[0]["status"].startswith("unavailable")


@pytest.mark.parametrize("provider", ["openvino", "onnxruntime"])
def test_peer_runtimes_match_eager(provider):
    pytest.importorskip(provider, reason=f"{provider} is not installed (pip install -e '.[peers]')")
    import torch

    from fastcnn.bench import peers
    from fastcnn.bench.providers import make_model

    model = make_model("resnet18", torch.float32, "cpu")
    fn = peers.build(provider, model)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
        got = fn(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("provider", ["openvino-bf16", "openvino-default"])
def test_openvino_runs_the_precision_it_is_asked_or_says_it_did_not(provider):
    """A bf16 model's input (fastcnn-bench --precision bf16) goes to OpenVINO as fp32; it runs
    bf16 where the CPU has native bf16, and the bf16 provider refuses a CPU where OpenVINO
    would quietly run f32."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install -e '.[peers]')")
    import torch

    from fastcnn.bench import peers
    from fastcnn.bench.providers import make_model

    model = make_model("resnet18", torch.bfloat16, "cpu")
    fn = peers.build(provider, model)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16)
    with torch.no_grad():
        expected = copy.deepcopy(model).float()(x.float())
    if provider == "openvino-bf16" and peers.openvino_default_precision() != "bf16":
        with pytest.raises(RuntimeError, match="compiled for f32, not bf16"):
            fn(x)
        return
    got = fn(x)
    scale = max(1.0, expected.abs().max().item())
    assert got.shape == expected.shape and (got - expected).abs().max().item() <= 5e-2 * scale
    assert peers.versions([provider])["openvino"] != "not installed"


def test_peers_refuse_what_they_do_not_compare():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    import torch

    from fastcnn.bench import peers
    from fastcnn.bench.providers import make_model

    fn = peers.build("onnxruntime", make_model("resnet18", torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="float32 CPU inputs only"):
        fn(torch.randn(1, 3, 32, 32, dtype=torch.float16))


def test_cpu_breakdown_sums_the_convolutions_of_the_timed_forwards():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "cpu_breakdown.py"
    spec = importlib.util.spec_from_file_location("cpu_breakdown", path)
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    conv = "onednn_verbose,exec,cpu,convolution,brgconv:avx512_core,forward_inference,x,y,{}"
    pool = "onednn_verbose,exec,cpu,pooling,jit:avx512_core,forward_inference,x,y,5.0"
    log = "\n".join([
        conv.format(100.0),  # a warm-up forward: before the start mark
        breakdown.START,
        conv.format(1.5), pool, conv.format(0.5),
        conv.format(1.0), conv.format(1.0),
        breakdown.END,
        conv.format(100.0),
    ])  # fmt: skip
    assert breakdown._verbose_conv_ms(log, calls=2) == (2.0, 2.0)


def test_peers_running_a_precision_of_their_own_are_checked_at_that_precision():
    """OpenVINO's default runs bf16 on CPUs with native bf16, even in an fp32 run: it is checked
    with bf16's tolerance there (and timed), the fp32 peers with fp32's."""
    import torch

    from fastcnn.bench.measure import INT8_MATCH_TOLERANCE, MATCH_TOLERANCE, tolerance_for

    fp32, bf16 = MATCH_TOLERANCE[torch.float32], MATCH_TOLERANCE[torch.bfloat16]
    assert tolerance_for("openvino", torch.float32) == fp32
    assert tolerance_for("fastcnn-cpu", torch.float32) == fp32
    assert tolerance_for("openvino-default", torch.float32) == bf16
    assert tolerance_for("openvino-bf16", torch.bfloat16) == bf16
    assert tolerance_for("fastcnn-int8", torch.float32) == INT8_MATCH_TOLERANCE
