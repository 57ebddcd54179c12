"""The tuning hooks (ops/tuning.py): shape classes, per-GPU tables, the tuner's choice and
what it writes. A fake device name and timer stand in for the GPU; the launch is a
recorder."""
import json

import pytest
import torch

from regnet_kernels.backends.triton import tuning

DEFAULT = {"num_warps": 4, "num_stages": 3}
CONSTS = {"CIN_G": 56, "KSIZE": 3, "BLOCK_M": 128}
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A CUDA device named "NVIDIA H200", tables read from and written to tmp_path only."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "PACKAGE_CONFIGS", tmp_path / "package")
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path / "user"))
    monkeypatch.delenv(tuning.TUNE_ENV, raising=False)
    monkeypatch.setattr(tuning, "_tables", {})
    return tmp_path


def write_table(path, configs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "configs": configs}))


def test_shape_class():
    key = tuning.shape_class("_k", CONSTS, 1000)
    assert key == "_k|BLOCK_M=128,CIN_G=56,KSIZE=3|rows<=1024"
    assert tuning.shape_class("_k", CONSTS, 1024) == key
    assert tuning.shape_class("_k", CONSTS, 1025) != key
    assert tuning.shape_class("_k", dict(CONSTS, CIN_G=64), 1000) != key
    assert tuning.gpu_slug("NVIDIA H200") == "nvidia-h200"


def test_heuristic_without_gpu_table_or_tuning(gpu):
    calls = []
    assert tuning.launch_options("_k", CONSTS, 1000, DEFAULT, calls.append,
                                  torch.device("cpu")) == DEFAULT
    assert tuning.launch_options("_k", CONSTS, 1000, DEFAULT, calls.append, CUDA) == DEFAULT
    assert not calls


def test_table_of_the_device_wins(gpu):
    key = tuning.shape_class("_k", CONSTS, 1000)
    write_table(gpu / "package" / "nvidia-h200.json", {key: {"num_warps": 8, "num_stages": 2}})
    write_table(gpu / "user" / "nvidia-h200.json", {key: {"num_warps": 8, "num_stages": 4}})
    write_table(gpu / "user" / "nvidia-h100-80gb-hbm3.json", {key: {"num_warps": 4,
                                                                     "num_stages": 2}})
    got = tuning.launch_options("_k", CONSTS, 1000, DEFAULT, None, CUDA)
    assert got == {"num_warps": 8, "num_stages": 4}  # the user's file, the H200's
    other = tuning.launch_options("_k", CONSTS, 5000, DEFAULT, None, CUDA)
    assert other == DEFAULT  # another shape class


def test_broken_table_is_ignored_with_a_message(gpu, capsys):
    (gpu / "user").mkdir()
    (gpu / "user" / "nvidia-h200.json").write_text("{not json")
    assert tuning.launch_options("_k", CONSTS, 1000, DEFAULT, None, CUDA) == DEFAULT
    assert "ignoring the tuning table" in capsys.readouterr().err


def test_tuning_times_every_candidate_and_writes_the_fastest(gpu, monkeypatch):
    monkeypatch.setenv(tuning.TUNE_ENV, "1")
    launched = []
    # the fake timer runs the launch once and says 8 warps / 2 stages is fastest
    def timer(fn):
        fn()
        opts = launched[-1]
        return 1.0 if (opts["num_warps"], opts["num_stages"]) == (8, 2) else 2.0 + opts["num_stages"]
    monkeypatch.setattr(tuning, "_cuda_timer", timer)
    got = tuning.launch_options("_k", CONSTS, 1000, DEFAULT, lambda **o: launched.append(o), CUDA)
    assert got == {"num_warps": 8, "num_stages": 2}
    assert len(launched) == len(tuning.CANDIDATES)
    saved = json.loads((gpu / "user" / "nvidia-h200.json").read_text())
    assert saved["gpu"] == "NVIDIA H200"
    assert saved["configs"] == {tuning.shape_class("_k", CONSTS, 1000): got}
    # tuned once: the next launch of the class reads the table, a fresh process the file
    launched.clear()
    assert tuning.launch_options("_k", CONSTS, 900, DEFAULT, None, CUDA) == got
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.delenv(tuning.TUNE_ENV)
    assert tuning.launch_options("_k", CONSTS, 900, DEFAULT, None, CUDA) == got
    assert not launched


def test_no_tuning_while_a_cuda_graph_is_captured(gpu, monkeypatch):
    monkeypatch.setenv(tuning.TUNE_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning.launch_options("_k", CONSTS, 1000, DEFAULT, None, CUDA) == DEFAULT
    assert not (gpu / "user").exists()


def test_the_conv_launchers_ask_for_their_options(monkeypatch):
    """Each conv launcher passes its kernel, constexprs, rows and heuristic to the hook, and
    launches with what it answers."""
    from regnet_kernels import ops
    from numerics import DEVICE, activation, bn_fold, conv_weight
    asked = []
    real = tuning.launch_options

    def spy(kernel, constexprs, rows, default, run, device):
        asked.append((kernel, constexprs, rows, default))
        return real(kernel, constexprs, rows, default, run, device)
    monkeypatch.setattr(tuning, "launch_options", spy)
    gen = torch.Generator().manual_seed(0)
    x = activation(2, 16, 5, 5, torch.float32, gen)
    w = conv_weight(16, 8, 3, torch.float32, gen)
    scale, shift = bn_fold(16, gen)
    ops.conv_bn_act(x, w, scale, shift, groups=2)
    (kernel, constexprs, rows, default), = asked
    assert kernel == "_conv_bn_act_kernel" and constexprs["CIN_G"] == 8 and rows == 50
    assert set(default) == {"num_warps", "num_stages"}
