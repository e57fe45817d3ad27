"""The device setting: cpu is the run without it, bit for bit; a device the machine lacks fails
before any work; on a CUDA GPU the data and model live there, a run repeats itself bit for bit
and stays close to the CPU run. The tests that need a GPU are skipped without one; test_scale.py
runs sampled mask rounds, resume and worker processes on each device too."""

import numpy as np
import pytest
import torch

from conftest import assert_same_run, needs_cuda, tiny_config, write_cifar
from mpfl.cli import main
from mpfl.errors import ConfigError
from mpfl.experiment import Experiment
from mpfl.records import read_summary
from mpfl.sim import simulate

without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_device_cpu_gives_exactly_the_run_without_the_setting():
    cpu, plain = simulate(tiny_config(rounds=1, mask_rounds=2, device="cpu")), simulate(tiny_config(rounds=1, mask_rounds=2))
    assert_same_run(cpu, plain)


@without_cuda
def test_device_cuda_without_a_gpu_fails_before_the_run_starts(tmp_path):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA GPU.*--device cpu"):
            simulate(tiny_config(device=device), tmp_path / device)
        assert not (tmp_path / device).exists()


@without_cuda
def test_mpfl_run_with_device_cuda_without_a_gpu_says_so_and_makes_no_run_dir(tmp_path, capsys):
    assert main(["run", "--device", "cuda", "--nodes", "2", "--train-samples", "500", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_device_names_are_checked_with_the_config(device):
    with pytest.raises(ConfigError, match="device"):
        tiny_config(device=device)


@pytest.mark.parametrize("spelled, device", [("CPU", "cpu"), (" Cuda:1 ", "cuda:1"), ("AUTO", "auto"), ("MPS", "mps")])
def test_device_names_are_read_in_any_case_and_recorded_in_lower_case(spelled, device):
    assert tiny_config(device=spelled).train.device == device


@needs_cuda
def test_a_gpu_index_past_the_last_gpu_names_the_gpus_there_are():
    with pytest.raises(ConfigError, match=r"CUDA GPU\(s\): cuda:0 to"):
        Experiment.from_config(tiny_config(device=f"cuda:{torch.cuda.device_count()}"))


@needs_cuda
def test_on_cuda_the_data_and_the_model_live_on_the_gpu_and_weights_come_back_as_numpy():
    exp = Experiment.from_config(tiny_config(device="cuda"))
    assert exp.device.type == "cuda"
    assert {t.device.type for t in (exp.dataset.x_train, exp.dataset.y_train, exp.dataset.x_test, exp.dataset.y_test)} == {"cuda"}
    assert {p.device.type for p in exp.model.parameters()} == {"cuda"}
    assert all(isinstance(w, np.ndarray) for w in exp.w0)


@needs_cuda
@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet18"])
def test_a_cuda_run_repeats_itself_bit_for_bit(model, tmp_path):
    overrides = {"device": "cuda", "model": model, "mask_rounds": 2, "rounds": 2}
    if model == "resnet18":  # random CIFAR-10 files: the same work per image as the real ones
        write_cifar(tmp_path, "cifar10", n=60)
        overrides.update(dataset="cifar10", data_dir=str(tmp_path), train_samples=300, test_samples=60, batch_size=16)
    cfg = tiny_config(**overrides)
    assert_same_run(simulate(cfg), simulate(cfg))


@needs_cuda
def test_a_cuda_run_ends_close_to_the_cpu_run():
    """The same run on both devices: float sums differ in their last bits, so weights drift apart a
    little over training, but the masks the nodes agree on and the accuracy barely move."""
    gpu, cpu = simulate(tiny_config(device="cuda")), simulate(tiny_config())
    assert [r["nodes"] for r in gpu.records] == [r["nodes"] for r in cpu.records]
    kept_gpu, kept_cpu = (np.concatenate([np.asarray(m, bool).ravel() for m in run.mask]) for run in (gpu, cpu))
    shared = (kept_gpu & kept_cpu).sum() / (kept_gpu | kept_cpu).sum()
    assert shared > 0.8, f"the final masks share {shared:.1%} of the weights they keep"
    assert abs(gpu.summary["final_accuracy"] - cpu.summary["final_accuracy"]) < 0.05


def test_the_first_line_and_the_summary_name_the_device_the_run_used(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--device", "auto", "--nodes", "2", "--train-samples", "500", "--rounds", "1", "--mask-rounds", "1",
                 "--out", str(out)]) == 0
    used = f"cuda:0 ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else \
        "mps" if torch.backends.mps.is_available() else "cpu"
    assert f"device={used} -> {out}" in " ".join(capsys.readouterr().err.split())
    assert read_summary(out)["device"] == used
    assert read_summary(out)["config"]["train"]["device"] == "auto"
