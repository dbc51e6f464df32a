"""fastcnn-bench: writes its three files, checks outputs before timing, refuses bad arguments."""

from __future__ import annotations

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
    assert args.provider_list == ["eager-cl", "jit", "compile", "fastcnn-cpu"]
    assert args.batches == [2]  # the explicit argument wins


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
