"""``fastmaml demo --backbone cnn`` (fastmaml/anil.py): the learned-representation experiment of issue 14.

The CNN demo runs end to end through the CLI, its fastmaml head and its plain-torch unrolled oracle give
the same meta-loss and backbone gradients, a run is reproducible from its seed, and the default (pixel)
demo never imports torch.
"""

import builtins
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("FASTMAML_REQUIRE_FRAMEWORKS"):
    import torch
else:
    torch = pytest.importorskip("torch")

from tolerances import RTOL_F64, assert_rel

from fastmaml import EpisodeSampler, adapt, anil, cli

pytest.importorskip("sklearn")  # the 8x8 digits and the pre-trained baseline's per-task LR


def _fastmaml_exe():
    exe = shutil.which("fastmaml")
    return [exe] if exe else [sys.executable, "-m", "fastmaml.cli"]


def _digits_batch(dtype, K=3, n_tasks=4, seed=0):
    """A meta-batch of 8x8 digit-pair episodes as images (T*(n+m), 1, 8, 8) plus its Tasks."""
    from fastmaml.datasets import load_digits_dataset

    data = load_digits_dataset("digits8x8")
    tasks = EpisodeSampler(data.X, data.y, n_way=2, k_shot=K, n_query=4, classes=[0, 1, 4, 5],
                           random_state=seed).sample(n_tasks)
    images = torch.from_numpy(data.X).to(dtype).reshape(-1, 1, 8, 8)
    return images, tasks


def test_quick_cnn_demo_through_the_cli_writes_every_method_and_shot(tmp_path):
    """The whole run from a fresh process in a temp folder: exit 0, the table, and a JSON with all four methods
    at every K, each with an accuracy, its CI and the paired differences, plus the side-by-side timing."""
    out_json = tmp_path / "cnn.json"
    proc = subprocess.run(_fastmaml_exe() + ["demo", "--backbone", "cnn", "--quick", "--data", "digits8x8",
                                             "--json", str(out_json), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    res = json.loads(out_json.read_text())
    cfg = anil.CNNDemoConfig.quick()
    assert sorted(res["shots"]) == sorted(str(K) for K in cfg.shots)
    # choices on validation digits the selection runs never trained on; refits on every non-test digit
    assert set(res["validation_digits"]).isdisjoint(res["train_digits"])
    assert sorted(res["meta_train_digits"]) == sorted(res["train_digits"] + res["validation_digits"])
    assert set(res["holdout"]).isdisjoint(res["meta_train_digits"])
    for K, shot in res["shots"].items():
        assert list(shot["table"]) == list(anil.METHODS)
        for name, row in shot["table"].items():
            assert len(row["per_task"]) == cfg.test_episodes
            assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy_ci95"] >= 0.0
            assert row["accuracy"] == pytest.approx(np.mean(row["per_task"]))
            for key in ("vs_pretrained", "vs_pixels"):
                assert set(row[key]) == {"mean", "ci95"}
        assert shot["table"][anil.PRETRAINED]["vs_pretrained"]["mean"] == 0.0
    per_it = res["timing"]["seconds_per_meta_iteration"]
    assert per_it[anil.ANIL_FASTMAML] > 0 and per_it[anil.ANIL_UNROLLED] > 0
    assert res["timing"]["head_forward_backward"]["fastmaml_seconds"] > 0
    for name in anil.METHODS:
        assert name in proc.stdout
    assert "meta-training through the head" in proc.stdout
    assert "per meta-iteration" in proc.stdout


def test_fastmaml_head_and_unrolled_torch_head_agree_on_loss_and_backbone_gradients():
    """(c) == (d) on one meta-batch in float64: the same meta-loss, and the same gradients for every backbone
    weight, theta and the step size (second order through the head, via the feature gradients)."""
    fastmaml_torch = pytest.importorskip("fastmaml.torch")
    images, tasks = _digits_batch(torch.float64)
    torch.manual_seed(0)
    backbone = anil.make_backbone((8, 8), n_features=16, channels=(4, 8)).double()
    grads = {}
    for kind in ("fastmaml", "unrolled"):
        head = anil.make_head(16, 0.7).double()
        with torch.no_grad():  # a non-zero start, so that every term of the meta-gradient is exercised
            head.theta.copy_(torch.linspace(-0.5, 0.5, 17, dtype=torch.float64))
        backbone.zero_grad()
        cfg = anil.CNNDemoConfig(inner_steps=4, n_threads=1)
        loss = anil._meta_loss_fn(kind, fastmaml_torch, cfg)(head, *anil._batch_features(backbone, images, tasks))
        loss.backward()
        grads[kind] = {"loss": loss.detach().numpy(), "theta": head.theta.grad.numpy().copy(),
                       "log_inner_lr": head.log_inner_lr.grad.numpy().copy(),
                       **{n: p.grad.numpy().copy() for n, p in backbone.named_parameters()}}
    assert set(grads["fastmaml"]) == set(grads["unrolled"])
    for key, value in grads["unrolled"].items():
        assert np.abs(value).max() > 0, key  # a gradient that vanished would agree trivially
        assert_rel(grads["fastmaml"][key], value, RTOL_F64, err_msg=key)


def test_unrolled_adapt_matches_fastmaml_adapt():
    """(d) is evaluated with its own torch inner loop, (c) with fastmaml.adapt: both adapt alike (float64)."""
    rng = np.random.default_rng(1)
    Xs, ys = rng.normal(size=(5, 6, 3)), rng.integers(0, 2, size=(5, 6))
    theta = rng.normal(size=4)
    phi = anil.unrolled_adapt(torch.from_numpy(theta), torch.from_numpy(Xs), torch.from_numpy(ys),
                              inner_lr=0.3, inner_steps=3)
    assert_rel(phi.numpy(), adapt(theta, Xs, ys, inner_lr=0.3, inner_steps=3), RTOL_F64)


def test_same_seed_same_numbers():
    """Seeded (numpy Generators + torch.manual_seed): a rerun reproduces every accuracy and meta-loss."""
    pytest.importorskip("fastmaml.torch")

    def run(seed):
        cfg = anil.CNNDemoConfig.quick(data="digits8x8", shots=(1,), test_episodes=10, val_episodes=5,
                                       meta_iterations=2, validate_every=1, pretrain_epochs=1, timing_repeats=1,
                                       seed=seed, progress=False)
        res = anil.run_cnn_demo(cfg, log=None)
        return ({n: r["per_task"] for n, r in res["shots"]["1"]["table"].items()},
                res["methods"][anil.ANIL_FASTMAML]["loss_curve"], res["validation_digits"])

    first, again = run(3), run(3)
    assert len(first[1]) == 2 and len(set(first[0][anil.PIXELS])) > 1  # something was trained and scored
    assert first == again


def test_default_demo_never_imports_torch(tmp_path):
    """The pixel demo (the default backbone) stays NumPy-only: torch is never imported, even installed."""
    code = ("import sys; from fastmaml import cli; "
            "rc = cli.main(['demo', '--quick', '--data', 'digits8x8', '--shots', '1', '--iterations', '2', "
            "'--test-episodes', '5', '--plot', '', '--no-progress']); "
            "assert rc == 0, rc; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m == 'fastmaml.anil'); "
            "assert not bad, bad; print('no torch')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "no torch" in proc.stdout


def test_cnn_demo_without_torch_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    """torch missing: one line naming pip install "fastmaml[torch]", exit 2, nothing computed or written."""
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    out_json = tmp_path / "r.json"
    code = cli.main(["demo", "--backbone", "cnn", "--quick", "--json", str(out_json), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert 'pip install "fastmaml[torch]"' in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not out_json.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--family", "grouped"], "--backbone cnn"),
    (["--all-pairs"], "--backbone cnn"),
    (["--ways", "3"], "--backbone cnn"),
    (["--holdout", "2,2"], "--holdout"),
    (["--holdout", "2,42"], "holdout"),
    (["--shots", "5,5"], "shots"),
])
def test_cnn_demo_rejects_options_it_cannot_honour(argv, needle, capsys):
    """Options of the pixel demo that the CNN run does not support end in one line naming them, exit 2."""
    code = cli.main(["demo", "--backbone", "cnn", "--quick", "--data", "digits8x8", "--no-progress"] + argv)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_ctrl_c_during_anil_meta_training_stops_with_exit_130(tmp_path):
    """Ctrl-C while ANIL meta-trains: exit 130, no table, no JSON."""
    import signal
    import time

    out_json = tmp_path / "r.json"
    proc = subprocess.Popen(_fastmaml_exe() + ["demo", "--backbone", "cnn", "--quick", "--data", "digits8x8",
                                               "--iterations", "100000", "--json", str(out_json), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        seen = ""
        while "ANIL, fastmaml head, choosing the iteration" not in seen:
            line = proc.stderr.readline()
            assert line, f"the demo ended early: {seen}"
            seen += line
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert "K = 1 shots" not in out and not out_json.exists()
