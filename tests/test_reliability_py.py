"""Reliability of the Python layer (issue 11): labels given to adapt, the class count of grouped
samplers, resume with other settings, edited and hostile checkpoint files, file modes, the cost
of frequent checkpoints, shard files and random_state."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest

import fastmaml
from fastmaml import MAML, Tasks
from fastmaml.checkpoint import CheckpointError
from fastmaml.datasets import make_grouped_tasks
from fastmaml.samplers import GroupedSampler


@pytest.fixture(scope="module")
def table():
    return make_grouped_tasks(n_groups=24, n_per_group=20, n_features=4, random_state=0)


def model(**kw):
    base = dict(inner_steps=2, inner_lr=0.3, meta_lr=0.05, meta_batch_size=4, n_iterations=6, progress=False)
    base.update(kw)
    return MAML(**base)


def source(table, seed=1):
    X, y, groups = table
    return GroupedSampler(X, y, groups, support_size=5, random_state=seed)


def checkpoint(tmp_path, table, **kw):
    path = tmp_path / "ckpt.npz"
    model(checkpoint_path=str(path), checkpoint_every=2, **kw).fit(source(table))
    return path


def raw(path):
    """(arrays, meta) of a file, read directly, for editing."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    return arrays, meta


def rewrite(path, arrays, meta=None, meta_bytes=None):
    payload = dict(arrays)
    if meta_bytes is None:
        meta_bytes = json.dumps(meta).encode()
    payload["__meta__"] = np.frombuffer(meta_bytes, dtype=np.uint8)
    np.savez(path, **payload)


# --------------------------------------------------------------------------- 1. adapt labels


def test_adapt_rejects_nan_labels_naming_y(table):
    fitted = model(n_iterations=1).fit(source(table))
    X = np.zeros((4, 4))
    with pytest.raises(ValueError, match="^y: contains NaN"):
        fitted.adapt(X, [np.nan, 1.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="^y: contains the label None"):
        fitted.adapt(X, np.array([None, "a", "b", "a"], dtype=object))


def test_adapt_needs_two_distinct_labels_for_a_binary_model(table):
    fitted = model(n_iterations=1).fit(source(table))
    X = np.random.default_rng(0).random((4, 4))
    with pytest.raises(ValueError, match=r"^y: .*exactly 2 distinct labels, got 1 \('cat'\)"):
        fitted.adapt(X, ["cat"] * 4)
    with pytest.raises(ValueError, match="^y: .*exactly 2 distinct labels, got 1"):
        fitted.adapt(X, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="^y: .*got 3"):
        fitted.adapt(X, [0, 1, 2, 1])
    two = fitted.adapt(X, ["dog", "cat", "dog", "cat"])
    assert two.classes_.tolist() == ["cat", "dog"]
    # the same adaptation as with the codes 0/1 ("dog" > "cat" is the positive class)
    coded = fitted.adapt(X, [1, 0, 1, 0])
    np.testing.assert_array_equal(two.coef_, coded.coef_)


# --------------------------------------------------------------------------- 2. grouped sampler classes


def test_grouped_sampler_decides_the_class_count_from_the_whole_table():
    X, y, groups = make_grouped_tasks(n_groups=20, n_per_group=12, n_features=3, random_state=0)
    y = y.copy()
    rare = groups == np.unique(groups)[7]
    y[np.flatnonzero(rare)[:3]] = 2  # label 2 appears in one group of twenty
    for seed in range(6):
        sampler = GroupedSampler(X, y, groups, support_size=6, random_state=seed)
        assert sampler.n_classes == 3
        fitted = model(meta_batch_size=4, n_iterations=3).fit(sampler)
        assert fitted.n_classes_ == 3 and fitted.theta_.shape == (4, 3)
    only_binary = GroupedSampler(X, y, groups, support_size=6, groups_subset=np.unique(groups)[:5])
    assert only_binary.n_classes == 2


# --------------------------------------------------------------------------- 3. resume with other settings


def test_resume_refuses_changed_settings_naming_each(tmp_path, table):
    path = checkpoint(tmp_path, table, l2=0.01)
    with pytest.raises(ValueError, match="resume:.*inner_lr=0.3 in the checkpoint, 0.2 in this model.*l2=0.01"):
        model(checkpoint_path=str(path), inner_lr=0.2, l2=0.02, n_iterations=10).fit(source(table), resume=True)
    with pytest.raises(ValueError, match="resume:.*meta_lr"):
        model(checkpoint_path=str(path), l2=0.01, meta_lr=0.5, n_iterations=10).fit(source(table), resume=True)
    # settings that cannot change results may differ: threads, progress, period, n_iterations (no schedule)
    resumed = model(checkpoint_path=str(path), l2=0.01, n_iterations=10, n_threads=1, checkpoint_every=3)
    resumed.fit(source(table), resume=True)
    assert resumed.n_iter_ == 10


def test_resume_with_cosine_schedule_refuses_another_n_iterations(tmp_path, table):
    path = checkpoint(tmp_path, table, lr_schedule="cosine")
    with pytest.raises(ValueError, match="resume:.*n_iterations=6 in the checkpoint, 9"):
        model(checkpoint_path=str(path), lr_schedule="cosine", n_iterations=9).fit(source(table), resume=True)


# --------------------------------------------------------------------------- 4. array shapes


@pytest.mark.parametrize("name, value", [
    ("opt.m.theta", np.zeros(3)),
    ("opt.v.theta", np.zeros((5, 2))),
    ("param.theta", np.zeros(5, dtype=np.float32)),
    ("fixed_inner_lr", np.zeros(2)),
    ("param.log_inner_lr", np.zeros(1)),
])
def test_an_array_of_another_shape_or_dtype_is_refused_on_load_and_resume(tmp_path, table, name, value):
    path = checkpoint(tmp_path, table)
    arrays, meta = raw(path)
    arrays[name] = value
    rewrite(path, arrays, meta)
    with pytest.raises(CheckpointError, match=f"ckpt.npz.*{name}"):
        MAML.load(path)
    fresh = model(checkpoint_path=str(path), n_iterations=8)
    with pytest.raises(CheckpointError, match=f"ckpt.npz.*{name}"):
        fresh.fit(source(table), resume=True)


# --------------------------------------------------------------------------- 5. hostile files


def npz_with_header(path, shape):
    """A small npz whose one member's header declares ``shape`` float64 values."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("param.theta.npy", header.getvalue() + b"\0" * 2048)
        zf.writestr("__meta__.npy", _npy(np.frombuffer(b'{"format": "fastmaml-model"}', dtype=np.uint8)))


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_a_member_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.npz"
    npz_with_header(path, (10**12,))
    assert path.stat().st_size < 4000
    with pytest.raises(CheckpointError, match="bomb.npz.*param.theta.npy.*declares shape"):
        MAML.load(path)


def test_a_plain_npy_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "plain.npy"
    np.save(path, np.arange(3.0))
    with pytest.raises(CheckpointError, match="plain.npy"):
        MAML.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(n_features=float("inf")), "n_features=inf"),
    (lambda m: m.update(n_features=10**30), "n_features"),
    (lambda m: m.update(n_classes="3"), "n_classes"),
    (lambda m: m.update(n_iter=None), "n_iter"),  # found by the fuzzer
    (lambda m: m.update(opt_t=None), "opt_t"),
    (lambda m: m.update(config=[1]), "config"),
    (lambda m: m["config"].update(inner_steps=-1), "inner_steps"),
    (lambda m: m["config"].update(bogus=1), "bogus"),
    (lambda m: m.update(best=[1]), "best"),
    (lambda m: m.update(history={"file": "../../etc/passwd", "records": 0, "bytes": 0, "crc32": 0}), "sidecar"),
    (lambda m: m.update(history=[1, 2]), "history"),
    (lambda m: m.update(format_version=2**70), "format version"),
])
def test_bad_metadata_is_a_checkpoint_error_naming_the_file(tmp_path, table, edit, message):
    path = checkpoint(tmp_path, table)
    arrays, meta = raw(path)
    edit(meta)
    rewrite(path, arrays, meta)
    with pytest.raises(CheckpointError, match=f"ckpt.npz.*{message}"):
        MAML.load(path)


def test_deeply_nested_metadata_is_a_checkpoint_error(tmp_path, table):
    path = checkpoint(tmp_path, table)
    arrays, meta = raw(path)
    body = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}"
    rewrite(path, arrays, meta_bytes=body.encode())
    with pytest.raises(CheckpointError, match="ckpt.npz.*nested"):
        MAML.load(path)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("config"),
    lambda m: m.update(sampler_state={"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}}),
    lambda m: m.update(sampler_state={"bit_generator": "NoSuchBitGenerator"}),
    lambda m: m.update(sampler_state={"bit_generator": "PCG64", "state": {"state": 10**100, "inc": 1},
                                      "has_uint32": 0, "uinteger": 0}),
    lambda m: m.update(opt_t=-3),
])
def test_resume_from_bad_metadata_is_a_checkpoint_error(tmp_path, table, edit):
    path = checkpoint(tmp_path, table)
    arrays, meta = raw(path)
    edit(meta)
    rewrite(path, arrays, meta)
    with pytest.raises(CheckpointError, match="ckpt.npz"):
        model(checkpoint_path=str(path), n_iterations=8).fit(source(table), resume=True)


# --------------------------------------------------------------------------- 6. file modes


def test_saved_files_respect_the_umask_and_keep_an_existing_mode(tmp_path, table):
    old = os.umask(0o022)
    try:
        path = checkpoint(tmp_path, table)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        sidecars = list(tmp_path.glob("ckpt.npz.history-*"))
        assert len(sidecars) == 1 and stat.S_IMODE(sidecars[0].stat().st_mode) == 0o644
        fitted = MAML.load(path)
        saved = tmp_path / "model.npz"
        fitted.save(saved)
        assert stat.S_IMODE(saved.stat().st_mode) == 0o644
        os.chmod(saved, 0o640)
        fitted.save(saved)
        assert stat.S_IMODE(saved.stat().st_mode) == 0o640
        os.umask(0o077)
        fitted.save(tmp_path / "private.npz")
        assert stat.S_IMODE((tmp_path / "private.npz").stat().st_mode) == 0o600
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- 7. checkpoint cost


def test_checkpoint_size_does_not_grow_with_history_and_resume_restores_it(tmp_path, table):
    path = tmp_path / "ckpt.npz"
    sizes = []

    def record_size(fitted, record):
        if record["iteration"] in (5, 60):
            sizes.append(path.stat().st_size)

    kw = dict(n_iterations=60, checkpoint_every=1)
    full = model(**kw).fit(source(table))
    part = model(checkpoint_path=str(path), callbacks=[record_size, lambda m, r: r["iteration"] == 60], **kw)
    part.fit(source(table))
    # the .npz (rewritten every iteration) holds no history: its size is the same at 5 and 60 records
    assert len(sizes) == 2 and abs(sizes[1] - sizes[0]) < 64
    sidecar = next(tmp_path.glob("ckpt.npz.history-*"))
    assert len(sidecar.read_bytes().splitlines()) == 60
    # a run killed between appending to the sidecar and renaming the .npz leaves bytes no checkpoint owns
    with open(sidecar, "ab") as fh:
        fh.write(b'{"iteration": 999, "loss": 0.0}\n{"truncat')
    loaded = MAML.load(path)
    assert len(loaded.history_) == 60
    resumed = model(checkpoint_path=str(path), **dict(kw, n_iterations=80))
    resumed.fit(source(table), resume=True)
    longer = model(**dict(kw, n_iterations=80)).fit(source(table))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history_) == strip(longer.history_)
    assert strip(MAML.load(path).history_) == strip(longer.history_)
    np.testing.assert_array_equal(resumed.theta_, longer.theta_)
    assert strip(full.history_) == strip(longer.history_[:60])


def test_a_new_run_replaces_the_sidecar_only_after_its_first_checkpoint(tmp_path, table):
    path = checkpoint(tmp_path, table)
    first = set(tmp_path.glob("ckpt.npz.history-*"))
    model(checkpoint_path=str(path), checkpoint_every=2).fit(source(table, seed=3))
    second = set(tmp_path.glob("ckpt.npz.history-*"))
    assert len(first) == len(second) == 1 and first != second
    assert len(MAML.load(path).history_) == 6


def test_a_missing_sidecar_is_a_checkpoint_error(tmp_path, table):
    path = checkpoint(tmp_path, table)
    next(tmp_path.glob("ckpt.npz.history-*")).unlink()
    with pytest.raises(CheckpointError, match="ckpt.npz.*sidecar.*missing"):
        MAML.load(path)


# --------------------------------------------------------------------------- 8. shard files


def test_a_truncated_shard_names_its_file(tmp_path):
    from fastmaml.distributed import load_shard_npz, save_shards_npz

    rng = np.random.default_rng(0)
    tasks = Tasks(rng.random((64, 4, 3)), rng.integers(0, 2, (64, 4)), rng.random((64, 4, 3)),
                  rng.integers(0, 2, (64, 4)))
    paths = save_shards_npz(tasks, tmp_path, shard_size=64)
    with open(paths[0], "rb") as fh:
        data = fh.read()
    with open(paths[0], "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=os.path.basename(paths[0])):
        load_shard_npz(paths[0])


# --------------------------------------------------------------------------- 9. random_state and inner_steps=0


def test_a_generator_random_state_gives_identical_fits_and_is_not_advanced(table):
    kw = dict(learn_inner_lr="preconditioner", n_iterations=0)
    gen = np.random.default_rng(5)
    before = gen.bit_generator.state
    a = model(random_state=gen, **kw).fit(source(table))
    b = model(random_state=gen, **kw).fit(source(table))
    c = model(random_state=np.random.default_rng(5), **kw).fit(source(table))
    assert gen.bit_generator.state == before
    np.testing.assert_array_equal(a._params["U"], b._params["U"])
    np.testing.assert_array_equal(a._params["U"], c._params["U"])
    with pytest.raises(TypeError, match="random_state"):
        model(random_state="abc", **kw).fit(source(table))


@pytest.mark.parametrize("mode", ["per_step", "per_step_parameter"])
def test_a_per_step_inner_lr_needs_an_inner_step(table, mode):
    with pytest.raises(ValueError, match="^learn_inner_lr: .*inner_steps >= 1"):
        model(inner_steps=0, learn_inner_lr=mode).fit(source(table))


# --------------------------------------------------------------------------
# Found by the adversarial review of this change
# --------------------------------------------------------------------------


def test_a_process_forked_during_a_compiled_fit_can_use_the_sampler(tmp_path):
    """The compiled loop draws from a private copy of the sampler's bit generator, so a child
    forked mid-fit never inherits the sampler's lock held (it used to hang forever)."""
    import subprocess
    import sys
    import tempfile
    import textwrap

    code = textwrap.dedent("""
        import os, threading, time, warnings, numpy as np, fastmaml
        warnings.simplefilter("ignore")
        rng = np.random.default_rng(0)
        X = rng.random((600, 20)); y = rng.integers(0, 5, 600)
        sm = fastmaml.EpisodeSampler(X, y, n_way=2, k_shot=3, n_query=5, random_state=0)
        model = fastmaml.MAML(n_iterations=60000, progress=False)  # one block of a few seconds
        status = []
        def forker():
            time.sleep(0.5)
            pid = os.fork()
            if pid == 0:
                sm.sample(3)
                os._exit(7)
            status.append(os.waitpid(pid, 0)[1])
        t = threading.Thread(target=forker); t.start()
        model.fit(sm); t.join()
        print(os.waitstatus_to_exitcode(status[0]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "7", out.stdout + out.stderr[-2000:]


def test_compiled_fit_leaves_the_sampler_where_its_draws_left_it():
    """Two fits in a row on one sampler equal one fit of both lengths' draws: the private copy's
    state is written back after each block."""
    rng = np.random.default_rng(1)
    X = rng.random((300, 8)); y = rng.integers(0, 4, 300)
    a = fastmaml.EpisodeSampler(X, y, n_way=2, k_shot=2, n_query=3, random_state=3)
    b = fastmaml.EpisodeSampler(X, y, n_way=2, k_shot=2, n_query=3, random_state=3)
    fastmaml.MAML(n_iterations=7, meta_batch_size=4, progress=False).fit(a)
    for _ in range(7):
        b.sample(4)
    np.testing.assert_array_equal(a.sample(5).support.y, b.sample(5).support.y)


@pytest.mark.parametrize("flag", ["False", 0, 1, None])
def test_flags_are_not_taken_by_truthiness(flag):
    rng = np.random.default_rng(0)
    tasks = (rng.random((2, 3, 4)), rng.integers(0, 2, (2, 3)), rng.random((2, 3, 4)), rng.integers(0, 2, (2, 3)))
    with pytest.raises(TypeError, match="first_order"):
        fastmaml.meta_value_and_grad(np.zeros(5), tasks, inner_lr=0.1, inner_steps=1, first_order=flag)
    with pytest.raises(TypeError, match="learn_init"):
        fastmaml.MAML(learn_init=flag).fit(fastmaml.Tasks(*tasks))


def test_features_too_large_for_any_step_size_are_named():
    rng = np.random.default_rng(0)
    t = Tasks(rng.random((16, 5, 3)) * 1e200, rng.integers(0, 2, (16, 5)),
              rng.random((16, 5, 3)) * 1e200, rng.integers(0, 2, (16, 5)))
    with pytest.raises(ValueError, match="support_X: the features are too large"):
        MAML(n_iterations=5, progress=False).fit(t)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_kernel_of_other_data_is_refused_and_the_right_one_kept(dtype):
    """A Gram kernel that is not X X^T (another dataset, or X edited after the kernel was made) would
    give silently wrong Gram matrices: its diagonal gives it away."""
    from fastmaml.datasets import dataset_kernel

    rng = np.random.default_rng(2)
    X = rng.random((40, 6)).astype(dtype)
    K = dataset_kernel(X)
    args = (X, [[0, 1, 2]], [[0, 1, 0]], [[3, 4]], [[1, 0]])
    assert fastmaml.Tasks.from_index(*args, kernel=K).kernel is not None
    X2 = X.copy()
    X2[7, 3] += 0.5
    with pytest.raises(ValueError, match=r"kernel: expected X X\^T .*kernel\[7, 7\]"):
        fastmaml.Tasks.from_index(X2, *args[1:], kernel=K)
    bad = K.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="kernel: .*NaN"):
        fastmaml.Tasks.from_index(*args, kernel=bad)


def test_non_finite_block_sums_are_refused_by_the_combiner():
    rng = np.random.default_rng(0)
    tasks = (rng.random((3, 4, 5)), rng.integers(0, 2, (3, 4)), rng.random((3, 4, 5)), rng.integers(0, 2, (3, 4)))
    part = fastmaml.meta_block_sums(np.zeros(6), tasks, inner_lr=0.1, inner_steps=2)
    assert np.isfinite(fastmaml.combine_block_sums([part]).loss)
    part.blocks[0, 1] = np.nan
    with pytest.raises(ValueError, match="parts: shard 0 holds non-finite sums"):
        fastmaml.combine_block_sums([part])
