"""`python -m regnet_kernels train`: runs on a tiny synthetic set (subprocesses, one
thread each), kill and resume, two ranks under gloo, the recipe's pieces, the data
folder reader and the errors."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regnet_kernels import data
from regnet_kernels.__main__ import main
from regnet_kernels.train import learning_rate, param_groups

REPO = Path(__file__).resolve().parent.parent
TINY = '{"depth": 3, "w0": 8, "wa": 8, "wm": 2, "group_width": 8, "se_ratio": 0.25}'
# 2 epochs of 16 steps of 4 images at 32 px: epoch 2 lasts long enough to be killed in
TINY_RUN = ["--params", TINY, "--data", "synthetic", "--synthetic-images", "64",
            "--num-classes", "4", "--resolution", "32", "--epochs", "2", "--batch-size", "4",
            "--warmup-epochs", "1", "--log-every", "4", "--threads", "1"]


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "regnet_kernels", "train", *TINY_RUN, "--out", str(out), *extra]


def run_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def run_train(out: Path, *extra: str, timeout: float = 300) -> dict:
    """Run to the end; returns the final JSON line."""
    done = subprocess.run(train_command(out, *extra), env=run_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


def test_killed_and_resumed_run_ends_bit_identical(tmp_path):
    """Killed (SIGKILL) right after epoch 1's checkpoint, then resumed: the final weights,
    BN statistics and optimizer state equal an uninterrupted run's exactly."""
    whole = run_train(tmp_path / "whole")
    assert math.isfinite(whole["train_loss"]) and whole["epochs"] == 2
    assert (tmp_path / "whole" / "metrics.json").exists()

    out = tmp_path / "killed"
    proc = subprocess.Popen(train_command(out), env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "checkpoint: epoch 1 saved" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint(out)["epoch"] == 1, "the run finished before it was killed"
    resumed = subprocess.run(train_command(out, "--resume"), env=run_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "epoch 1/2 step" not in resumed.stdout

    a, b = checkpoint(tmp_path / "whole"), checkpoint(out)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        momentum = b["optimizer"]["state"][index]["momentum_buffer"]
        assert torch.equal(state["momentum_buffer"], momentum), index
    assert a["metrics"] == b["metrics"]


def test_two_ranks_under_gloo_with_sync_bn_amp_and_channels_last(tmp_path):
    """As torchrun starts it (RANK, WORLD_SIZE, MASTER_*): DDP over gloo, BN statistics
    over both ranks, bf16 autocast, channels_last; one epoch; only rank 0 writes."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = run_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = tmp_path / f"rank{rank}"  # each rank's folder: rank 0 writes, rank 1 must not
        procs.append(subprocess.Popen(
            train_command(out, "--epochs", "1", "--sync-bn", "--amp", "bf16", "--channels-last"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    final = json.loads(logs[0].strip().splitlines()[-1])
    assert final["world_size"] == 2 and final["amp"] == "bf16"
    assert math.isfinite(final["train_loss"])
    assert "images/s" in logs[0] and "eta" in logs[0]
    assert not (tmp_path / "rank1" / "checkpoint.pt").exists()


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = {"name": "regnetx_200mf", "params": {"depth": 13, "w0": 24}}
    torch.save({"settings": {"model": other}}, out / "checkpoint.pt")
    threads = torch.get_num_threads()  # the run sets --threads 1 in this process
    try:
        assert main(["train", *TINY_RUN, "--out", str(out), "--resume"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert "is a checkpoint of regnetx_200mf" in capsys.readouterr().err
    torch.save({"model": {}}, out / "checkpoint.pt")  # e.g. a bare state_dict file
    try:
        assert main(["train", *TINY_RUN, "--out", str(out), "--resume"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert "is not a checkpoint of this command" in capsys.readouterr().err


def test_sync_bn_of_the_reference_model_on_cpu_is_refused(tmp_path, capsys):
    """torch's SyncBatchNorm cannot run on CPU tensors: an error, not per-rank statistics."""
    argv = ["train", *TINY_RUN, "--out", str(tmp_path), "--reference", "--sync-bn",
            "--device", "cpu"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 2
    finally:
        torch.set_num_threads(threads)
    assert "--sync-bn with --reference needs CUDA" in capsys.readouterr().err


def test_learning_rate_schedule():
    class Args:
        lr, epochs, warmup_epochs, warmup_factor = 0.8, 10, 2.0, 0.1
    steps = 5
    assert learning_rate(0, steps, Args) == pytest.approx(0.08)  # warmup starts at 0.1 x lr
    at_warmup_end = 0.5 * 0.8 * (1 + math.cos(math.pi * 2 / 10))
    assert learning_rate(2 * steps, steps, Args) == pytest.approx(at_warmup_end)
    assert learning_rate(steps, steps, Args) == pytest.approx(
        0.5 * 0.8 * (1 + math.cos(math.pi / 10)) * 0.55)
    assert learning_rate(10 * steps - 1, steps, Args) < 1e-3  # cosine to 0
    lrs = [learning_rate(s, steps, Args) for s in range(2 * steps, 10 * steps)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_spares_batchnorm():
    import regnet_kernels as rk
    model = rk.reference_model(rk.RegNetParams(depth=2, w0=8, wa=8, wm=2.0, group_width=8),
                               num_classes=4)
    decay, no_decay = param_groups(model, 5e-5)
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
          for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == bn and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 5e-5
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_epoch_batches_shard_and_reshuffle():
    a = data.epoch_batches(50, 4, epoch=3, seed=1, rank=0, world=2)
    b = data.epoch_batches(50, 4, epoch=3, seed=1, rank=1, world=2)
    assert len(a) == len(b) == 6 and all(len(batch) == 4 for batch in a + b)
    flat_a, flat_b = sum(a, []), sum(b, [])
    assert not set(flat_a) & set(flat_b)  # disjoint shards
    assert a == data.epoch_batches(50, 4, epoch=3, seed=1, rank=0, world=2)  # reproducible
    assert a != data.epoch_batches(50, 4, epoch=4, seed=1, rank=0, world=2)  # reshuffled
    every = data.epoch_batches(10, 4, 0, 0, rank=0, world=1, shuffle=False, drop_last=False)
    assert every == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_data_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="is not a directory"):
        data.find_images(tmp_path / "missing")
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.find_images(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match="no images"):
        data.find_images(tmp_path)
    assert main(["train", "--model", "regnetx_200mf", "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "out")]) == 2


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    classes, samples = data.find_images(tmp_path)
    assert classes == ["cat", "dog"] and [label for _, label in samples] == [0, 0, 1, 1]

    def read(path):
        raise OSError(f"cannot identify image file {path!r}")

    dataset = data.FolderDataset(tmp_path, 32, train=True, read=read)
    assert all(dataset[i] is None for i in range(len(dataset)))
    good = (torch.zeros(3, 32, 32), 1)
    x, y, skipped = data.collate([None, good, None])
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [1] and skipped == 2
    assert data.collate([None, None]) == (None, None, 2)


@pytest.mark.skipif(__import__("importlib").util.find_spec("PIL") is not None,
                    reason="Pillow is installed: the folder is readable")
def test_image_folder_without_pillow_or_torchvision_is_a_clear_error():
    with pytest.raises(data.DataError, match="needs Pillow"):
        data.image_reader()


@pytest.mark.skipif(__import__("importlib").util.find_spec("PIL") is None,
                    reason="writing test images needs Pillow")
def test_train_on_an_image_folder_with_a_corrupt_image(tmp_path):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for c in ("a", "b"):
            folder = tmp_path / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    final = run_train(tmp_path / "out", "--data", str(tmp_path / "images"), "--epochs", "1",
                      "--batch-size", "2", "--workers", "0")
    assert final["skipped_images"] == 1
    assert final["val_images"] == 4 and 0.0 <= final["val_top1"] <= 1.0
