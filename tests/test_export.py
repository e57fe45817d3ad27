"""`mpfl export`: compact and sparse files that load safely and predict exactly like the masked model."""

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mpfl import codec
from mpfl.checkpoint import load_final
from mpfl.cli import main
from mpfl.core.params import param_spec, set_weights
from mpfl.data import load_dataset
from mpfl.errors import ExportError
from mpfl.export import _write_onnx, export_run, load_export
from mpfl.models import build_model
from mpfl.sim import simulate

SMALL = {"model": "mlp", "nodes": 2, "mask_rounds": 1, "rounds": 1, "sparsity": 0.5, "train_samples": 600,
         "test_samples": 100}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the runs below use; restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_batch():
    return load_dataset("mnist").x_test[:64]


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "filter"
    return simulate(tiny_config(criterion="filter", **SMALL), out)


@pytest.fixture(scope="module")
def unstructured_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "magnitude"
    return simulate(tiny_config(**{**SMALL, "sparsity": 0.9}), out)


def masked_model(result, structured):
    """The full-size model holding the run's final weights with its final mask applied, as the run evaluated it."""
    model = build_model("mlp", (1, 28, 28), 10)
    spec = param_spec(model, structured=structured)
    set_weights(model, spec, spec.apply(result.weights, result.mask))
    return model.eval()


def logits(model, x):
    with torch.inference_mode():
        return model(x)


def test_run_directory_holds_the_final_weights_and_mask(structured_run):
    final = load_final(structured_run.run_dir)
    spec = param_spec(build_model("mlp", (1, 28, 28), 10), structured=True)
    assert final.input_shape == (1, 28, 28) and final.num_classes == 10
    assert all(np.array_equal(final.weights[n], w) for n, w in zip(spec.names, structured_run.weights))
    assert all(np.array_equal(final.mask[n], m) for n, m in zip(spec.prunable_names, structured_run.mask))


def test_structured_export_is_smaller_and_predicts_like_the_masked_model(structured_run, test_batch, tmp_path):
    info = export_run(structured_run.run_dir, tmp_path, formats=["state_dict", "torchscript", "sparse"], repeats=3)
    reference = logits(masked_model(structured_run, True), test_batch)
    for fmt in ("state_dict", "torchscript", "sparse"):
        got = logits(load_export(tmp_path, fmt), test_batch)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(1), reference.argmax(1))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    k1, k2 = state["1.weight"].shape[0], state["3.weight"].shape[0]
    assert state["1.weight"].shape == (k1, 784) and state["3.weight"].shape == (k2, k1) and state["5.weight"].shape == (10, k2)
    assert info["compact"] and info["max_abs_diff"] < 1e-5
    assert info["dense"]["flops"] == 2 * (784 * 200 + 200 * 200 + 200 * 10)
    assert info["pruned"]["flops"] == 2 * (784 * k1 + k1 * k2 + k2 * 10)
    assert info["pruned"]["parameters"] == 785 * k1 + (k1 + 1) * k2 + (k2 + 1) * 10
    assert info["pruned"]["bytes"] == (tmp_path / "model.pt").stat().st_size < info["dense"]["bytes"]
    assert info["dense"]["latency_ms"] > 0 and info["pruned"]["latency_ms"] > 0
    assert json.loads((tmp_path / "export.json").read_text()) == info


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_unstructured_export_round_trips_sparse_tensors_and_the_mask(unstructured_run, test_batch, tmp_path, layout):
    info = export_run(unstructured_run.run_dir, tmp_path, layout=layout, repeats=3)
    assert info["formats"] == ["sparse"] and not info["compact"]
    state = torch.load(tmp_path / "model.sparse.pt", weights_only=True)
    spec = param_spec(build_model("mlp", (1, 28, 28), 10))
    masked = spec.apply(unstructured_run.weights, unstructured_run.mask)
    want = torch.sparse_csr if layout == "csr" else torch.sparse_coo
    for i, name in zip(spec.prunable, spec.prunable_names):
        assert state[name].layout == want
        assert np.array_equal(state[name].to_dense().reshape(spec.shapes[i]).numpy(), masked[i])
    mask = codec.decode_mask((tmp_path / "mask.bin").read_bytes(), spec.full_mask()).tensors
    assert all(np.array_equal(a, b) for a, b in zip(mask, unstructured_run.mask))
    reference = logits(masked_model(unstructured_run, False), test_batch)
    torch.testing.assert_close(logits(load_export(tmp_path), test_batch), reference, rtol=0, atol=0)
    kept = sum(int(m.sum()) for m in unstructured_run.mask)
    assert info["pruned"]["parameters"] == kept + 200 + 200 + 10
    assert info["pruned"]["bytes"] < info["dense"]["bytes"]


def test_the_pruned_bytes_are_those_of_the_smallest_file_asked_for_whatever_the_order(unstructured_run, tmp_path,
                                                                                      capsys):
    args = ["export", str(unstructured_run.run_dir), "--out", str(tmp_path), "--repeats", "1", "--format", "state_dict",
            "sparse", "torchscript"]
    assert main(args) == 0
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["primary"] == "sparse" and info["pruned"]["bytes"] == (tmp_path / "model.sparse.pt").stat().st_size
    assert info["pruned"]["bytes"] < (tmp_path / "model.pt").stat().st_size
    assert "(pruned bytes: model.sparse.pt)" in capsys.readouterr().out
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(load_export(tmp_path, "torchscript"), x), logits(load_export(tmp_path), x))


def test_export_command_writes_files_and_refuses_what_it_cannot_do(structured_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(structured_run.run_dir), "--out", str(out), "--repeats", "2"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.ts", "mask.bin", "export.json"}
    assert "FLOPs" in capsys.readouterr().out
    assert main(["export", str(tmp_path), "--repeats", "2"]) == 2
    assert main(["export", str(tmp_path / "nope"), "--repeats", "2"]) == 2
    assert f"{tmp_path / 'nope'} does not exist; give the folder of a finished run" in capsys.readouterr().err


def test_onnx_without_its_packages_is_refused_before_anything_is_written(structured_run, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnxscript" else
                        find_spec(name, *args))
    with pytest.raises(ExportError, match=r"ONNX export needs the onnxscript package\(s\), which are not installed "
                                          r"\(pip install onnxscript"):
        export_run(structured_run.run_dir, tmp_path / "exp", formats=["onnx"], repeats=2)
    assert not (tmp_path / "exp").exists()


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs the onnx package")
def test_an_onnx_export_is_one_file_that_holds_its_weights_and_takes_any_batch(structured_run, tmp_path, capfd):
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    info = export_run(structured_run.run_dir, tmp_path / "exp", formats=["onnx"], repeats=1)
    assert "[torch.onnx]" not in "".join(capfd.readouterr())  # the exporter's progress lines are not printed
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["export.json", "mask.bin", "model.onnx",
                                                                     "model.pt"]
    model = onnx.load(str(tmp_path / "exp" / "model.onnx"))
    stored = sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
    assert stored >= info["pruned"]["parameters"] > 0 and info["file_bytes"]["onnx"] > 4 * info["pruned"]["parameters"]
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    [out] = ReferenceEvaluator(model).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, logits(load_export(tmp_path / "exp"), x).numpy(), rtol=1e-4, atol=1e-5)


def test_an_onnx_export_that_fails_is_one_error_line_and_leaves_the_folder_as_it_was(structured_run, tmp_path,
                                                                                      monkeypatch, capsys):
    monkeypatch.setattr("mpfl.export._check_onnx", lambda: None)
    assert main(["export", str(structured_run.run_dir), "--out", str(tmp_path / "exp"), "--repeats", "1"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()}
    capsys.readouterr()

    def fails(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::foo\n" + "a page of graph dump\n" * 50)

    monkeypatch.setattr(torch.onnx, "export", fails)
    assert main(["export", str(structured_run.run_dir), "--out", str(tmp_path / "exp"), "--repeats", "1", "--format",
                 "onnx", "--force"]) == 2
    assert capsys.readouterr().err == ("error: torch's ONNX exporter could not export the model (RuntimeError: "
                                       "unsupported operator aten::foo); --format torchscript or state_dict may work\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()} == before


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs the onnx package")
@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))])
@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export exporter", "TorchScript exporter"])
def test_an_onnx_model_computes_what_the_torch_model_does_at_any_batch_size(name, shape, dynamo, tmp_path):
    """With either of torch's exporters (the TorchScript one is torch's default before 2.9)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval()
    _write_onnx(model, torch.zeros(1, *shape), tmp_path / "model.onnx", dynamo=dynamo)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert sum(t.ByteSize() for t in graph.initializer) > 3 * sum(p.numel() for p in model.parameters())  # in the file
    session = ReferenceEvaluator(onnx.load(str(tmp_path / "model.onnx")))
    for batch in (1, 3):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        [out] = session.run(None, {"input": x.numpy()})
        np.testing.assert_allclose(out, logits(model, x).numpy(), rtol=1e-4, atol=1e-5)


def test_a_final_file_naming_an_input_no_model_can_take_is_an_export_error(unstructured_run, tmp_path, capsys):
    run = shutil.copytree(unstructured_run.run_dir, tmp_path / "run")
    with np.load(run / "final.npz") as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(run / "final.npz", **{**arrays, "input_shape": np.array([1, 10**9, 10**9], dtype=np.int64)})
    assert main(["export", str(run), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "final.npz names an input shape (1, 1000000000, 1000000000) and 10 classes that model 'mlp' cannot" in err
    assert len(err.strip().splitlines()) == 1 and not (run / "export").exists()


def test_an_unfinished_run_is_refused_with_how_to_finish_it(unstructured_run, tmp_path, capsys):
    run = shutil.copytree(unstructured_run.run_dir, tmp_path / "run")
    (run / "summary.json").unlink()
    (run / "final.npz").unlink()
    log = (run / "rounds.jsonl").read_text()
    (run / "rounds.jsonl").write_text(log.splitlines(keepends=True)[0])  # stopped before its first checkpoint
    assert main(["export", str(run), "--repeats", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{run} holds a run that has not finished (it has no summary.json yet)" in err
    assert f"mpfl run --resume {run}), then export it" in err and not (run / "export").exists()
    (run / "rounds.jsonl").write_text(log)  # rounds that no checkpoint holds: a resume would refuse them
    assert main(["export", str(run), "--repeats", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "it cannot be resumed either: " in err and "has no checkpoint.npz" in err and "--resume" not in err


@pytest.mark.parametrize("rounds", [0, 2])
def test_a_filter_run_ends_with_the_function_its_shrunk_export_computes(tmp_path, rounds):
    # Nodes train the shrunk model; the server clears what dropped filters own (server momentum included),
    # so the model the run evaluated and the export agree, whether the run ends in the mask or the training phase.
    result = simulate(tiny_config(criterion="filter", **{**SMALL, "rounds": rounds}), tmp_path / "run")
    final = load_final(result.run_dir)
    dropped = ~final.mask["1.weight"].any(axis=1)
    assert dropped.any() and not dropped.all()
    assert (final.weights["1.bias"][dropped] == 0).all() and (final.weights["3.weight"][:, dropped] == 0).all()
    info = export_run(result.run_dir, tmp_path / "exp", formats=["state_dict"], repeats=2)
    assert info["max_abs_diff"] < 1e-5


def test_an_export_of_weights_that_keep_dropped_filters_biases_says_how_far_it_differs(structured_run, tmp_path,
                                                                                        capsys):
    run = shutil.copytree(structured_run.run_dir, tmp_path / "run")
    with np.load(run / "final.npz") as f:
        arrays = {k: f[k] for k in f.files}
    dropped = ~arrays["m/1.weight"].any(axis=1)
    arrays["w/1.bias"][dropped] = 1  # a dropped unit passing on relu(1) to the next layer
    arrays["w/3.weight"][:, dropped] = 0.5
    np.savez(run / "final.npz", **arrays)
    assert main(["export", str(run), "--repeats", "1"]) == 0
    assert "differs from the masked model by up to" in capsys.readouterr().out


def snapshot(folder):
    """Every entry of a folder (hidden ones too) with the sha256 of its content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def earlier_export(structured_run, tmp_path):
    """A folder holding an earlier export (state_dict, torchscript and sparse) beside a file of the user's."""
    out = tmp_path / "exp"
    export_run(structured_run.run_dir, out, formats=["state_dict", "torchscript", "sparse"], repeats=2)
    (out / "notes.txt").write_text("mine\n")
    return out


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--repeats", "-3"), ("--latency-batch", "-1"),
                                         ("--latency-batch", "0"), ("--latency-batch", "100000000"),
                                         ("--threads", "-2")])
def test_bad_latency_settings_are_refused_before_anything_is_written(structured_run, earlier_export, tmp_path, capsys,
                                                                      flag, value):
    before = snapshot(earlier_export)
    for out, force in ((tmp_path / "new" / "exp", []), (earlier_export, ["--force"])):
        assert main(["export", str(structured_run.run_dir), "--out", str(out), flag, value, *force]) == 2
        assert f"{flag} {value}" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and snapshot(earlier_export) == before


def test_an_export_failing_part_way_leaves_the_folder_as_it_was(structured_run, earlier_export, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("timing failed")

    before = snapshot(earlier_export)
    monkeypatch.setattr("mpfl.export.latency_ms", broken)
    for out in (earlier_export, tmp_path / "new" / "exp"):
        with pytest.raises(RuntimeError, match="timing failed"):
            export_run(structured_run.run_dir, out, formats=["sparse"], repeats=2, force=True)
    assert not (tmp_path / "new").exists() and snapshot(earlier_export) == before


def test_a_failure_while_moving_the_files_into_place_puts_the_earlier_export_back(structured_run, earlier_export,
                                                                                   monkeypatch):
    replace, failed = os.replace, []

    def flaky(src, dst):
        if Path(dst) == earlier_export / "export.json" and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        replace(src, dst)

    before = snapshot(earlier_export)
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        export_run(structured_run.run_dir, earlier_export, formats=["sparse"], layout="coo", repeats=2, force=True)
    assert failed and snapshot(earlier_export) == before


def test_force_replaces_the_whole_earlier_export_and_keeps_other_files(structured_run, earlier_export):
    assert main(["export", str(structured_run.run_dir), "--out", str(earlier_export), "--format", "state_dict",
                 "--repeats", "2", "--force"]) == 0
    assert {p.name for p in earlier_export.iterdir()} == {"model.pt", "mask.bin", "export.json", "notes.txt"}
    assert (earlier_export / "notes.txt").read_text() == "mine\n"
    assert json.loads((earlier_export / "export.json").read_text())["formats"] == ["state_dict"]


def test_files_by_an_exports_names_that_no_export_there_lists_are_the_users_and_never_replaced(structured_run,
                                                                                              earlier_export, tmp_path,
                                                                                              capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("model.pt", "model.onnx", "mask.bin", "notes.txt"):
        (mine / name).write_text(f"my {name}\n")
    (earlier_export / "model.onnx").write_text("my onnx\n")  # beside an export that did not write it
    for out, theirs in ((mine, "mask.bin, model.pt, model.onnx"), (earlier_export, "model.onnx")):
        before = snapshot(out)
        for force in ([], ["--force"]):  # named at once, not after a --force that cannot help
            assert main(["export", str(structured_run.run_dir), "--out", str(out), "--repeats", "1", *force]) == 2
            err = " ".join(capsys.readouterr().err.split())
            assert f"{out} holds {theirs}, which no export there lists (in its export.json)" in err
            assert "even with --force" in err and snapshot(out) == before


def test_a_run_directory_is_refused_as_an_export_folder(structured_run, unstructured_run, capsys):
    out = unstructured_run.run_dir
    before = snapshot(out)
    for force in ([], ["--force"]):
        assert main(["export", str(structured_run.run_dir), "--out", str(out), "--repeats", "1", *force]) == 2
        assert f"{out} is a run directory; an export needs a folder of its own" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_run_still_going_is_refused_with_when_to_export_it(structured_run, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    run = tmp_path / "running"
    run.mkdir()
    shutil.copy(structured_run.run_dir / "config.toml", run / "config.toml")
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"12345\n")
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["export", str(run), "--repeats", "2"]) == 2
    finally:
        os.close(fd)
    message = " ".join(capsys.readouterr().err.split())
    assert "still going" in message and "export it once it has finished" in message
    assert not (run / "export").exists()


def test_a_scratch_folder_left_by_a_killed_export_neither_blocks_nor_stays(structured_run, tmp_path):
    out = tmp_path / "exp"
    (out / ".export-killed.tmp").mkdir(parents=True)
    (out / ".export-killed.tmp" / "model.pt").write_bytes(b"half")
    export_run(structured_run.run_dir, out, formats=["state_dict"], repeats=2)
    assert {p.name for p in out.iterdir()} == {"model.pt", "mask.bin", "export.json"}


def test_a_run_that_pruned_nothing_exports_its_dense_state_dict(tmp_path, test_batch):
    """Sparse tensors of an unpruned model would only add indices: twice the dense bytes, called pruned."""
    run = simulate(tiny_config(**{**SMALL, "method": "fedavg"}), tmp_path / "fedavg")
    info = export_run(run.run_dir, tmp_path / "export", repeats=1)
    assert info["formats"] == ["state_dict"] and info["primary"] == "state_dict" and info["density"] == 1.0
    assert info["pruned"]["bytes"] == info["dense"]["bytes"] and info["pruned"]["latency_note"] is None
    reference = logits(masked_model(run, False), test_batch)
    torch.testing.assert_close(logits(load_export(tmp_path / "export"), test_batch), reference, rtol=0, atol=0)


def test_a_filter_runs_sparse_export_reports_the_full_size_model_it_holds(structured_run, tmp_path):
    """Asked for sparse tensors only, the figures are those of the masked full-size model in the file,
    not of the shrunk model no file holds."""
    info = export_run(structured_run.run_dir, tmp_path, formats=["sparse"], repeats=1)
    dense, kept = info["dense"], sum(int(m.sum()) for m in structured_run.mask)
    spec = param_spec(build_model("mlp", (1, 28, 28), 10), structured=True)
    assert info["primary"] == "sparse"
    assert info["pruned"]["parameters"] == dense["parameters"] - (int(spec.prunable_sizes.sum()) - kept)
    assert info["pruned"]["flops"] == sum(layer["pruned_flops"] for layer in info["layers"]) < dense["flops"]
    assert info["pruned"]["latency_note"].startswith("dense kernels")


def test_loading_an_export_of_a_plug_in_model_says_to_import_the_plug_in_first(unstructured_run, tmp_path):
    export_run(unstructured_run.run_dir, tmp_path, repeats=1)
    info = json.loads((tmp_path / "export.json").read_text())
    (tmp_path / "export.json").write_text(json.dumps({**info, "model": "users-own-net", "plugins": ["nets.py"]}))
    with pytest.raises(ExportError, match=r"'users-own-net' comes from a plug-in of the run \(nets\.py\): import it "
                                          r"first .* or export it with --format torchscript too"):
        load_export(tmp_path)  # the default export of a magnitude run holds no TorchScript file
    info = {**info, "files": {**info["files"], "torchscript": "model.ts"}}
    (tmp_path / "export.json").write_text(json.dumps({**info, "model": "users-own-net", "plugins": ["nets.py"]}))
    with pytest.raises(ExportError, match=r"or load its TorchScript file with torch\.jit\.load, which needs no plug-in"):
        load_export(tmp_path)


def test_a_file_of_a_run_or_the_run_folder_given_for_its_export_names_the_folder_to_give(unstructured_run, tmp_path,
                                                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(unstructured_run.run_dir, run)
    assert main(["export", str(run / "config.toml"), "--out", str(run.parent / "x")]) == 2
    assert f"{run / 'config.toml'} is a file; give the folder of a finished run ({run})" in capsys.readouterr().err
    export_run(run, repeats=1, force=True)
    with pytest.raises(ExportError, match=f"has no export.json; the run's own export is {run / 'export'}"):
        load_export(run)


def test_export_says_why_a_filter_mask_was_not_shrunk_and_what_its_latency_ratio_means(tmp_path, capsys, monkeypatch):
    """A filter mask on a model `compact` cannot shrink (resnet18's residual blocks) is stored as sparse
    tensors: the printed summary says why, and that its latency ratio is noise."""
    import mpfl.export

    figures = {"parameters": 10, "bytes": 100, "flops": 1000, "latency_ms": 1.0}
    info = {"dense": figures, "pruned": {**figures, "latency_ms": 0.5,
                                         "latency_note": "dense kernels: a model that is not shrunk runs no faster"},
            "files": {"sparse": "model.sparse.pt"}, "primary": "sparse", "max_abs_diff": 0.0,
            "not_compact_because": "layer 3 (BasicBlock) is not a Linear, Conv, BatchNorm, pooling or activation"}
    monkeypatch.setattr(mpfl.export, "export_run", lambda *args, **kwargs: info)
    assert main(["export", str(tmp_path), "--repeats", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("note: the filter mask's model was not shrunk, so it is stored as sparse tensors: layer 3 (BasicBlock) "
            "is not a Linear") in out
    assert "note: latency: dense kernels: a model that is not shrunk runs no faster; the ratio is run-to-run noise" in out
