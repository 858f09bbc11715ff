"""Explaining whole datasets: the manifest of `lrpc explain --images` (resumable runs, error rows), the SpRAy audit
(`lrpc audit`) on a planted shortcut, and the Ray Data executor (`lrpc.ray`, `lrpc explain --ray`)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from cli_helpers import DIGITS, one_line_error, run_cli

pytest.importorskip("PIL")
sklearn = pytest.importorskip("sklearn")

DIGITS_SAMPLES = Path(__file__).resolve().parents[1] / "models" / "digits_samples.npz"
MARK = (slice(0, 2), slice(6, 8))  # the watermark: a bright 2x2 block in the top-right corner
CLASS = 3


def _watermark_model(folder: Path):
    """An MLP (64 -> 32 -> 10) trained here on scikit-learn's digits where half of the 3s carry the watermark, so
    the model learns it as evidence of a 3 (checked below); writes the ONNX model and 8x8 PNGs of 30 watermarked
    3s, 30 clean 3s and 20 fives. Returns (model path, image folder, {stem: "marked" | "clean" | "five"})."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.astype(np.float32) / 16.0, digits.target
    rng = np.random.default_rng(0)
    marked = (y == CLASS) & (rng.random(len(y)) < 0.5)
    x[(marked, *MARK)] = 1.0
    flat, onehot = x.reshape(len(x), 64).astype(np.float64), np.eye(10)[y]
    w1, b1 = rng.normal(0, 0.3, (64, 32)), np.zeros(32)
    w2, b2 = rng.normal(0, 0.3, (32, 10)), np.zeros(10)
    logits = lambda a: np.maximum(a @ w1 + b1, 0) @ w2 + b2
    for _ in range(400):  # full-batch gradient descent on the cross-entropy
        h = np.maximum(flat @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - onehot) / len(flat)
        gh = g @ w2.T * (h > 0)
        for param, grad in ((w1, flat.T @ gh), (b1, gh.sum(0)), (w2, h.T @ g), (b2, g.sum(0))):
            param -= 0.5 * grad
    assert (logits(flat).argmax(1) == y).mean() > 0.95
    # the shortcut is real: removing the watermark lowers the 3-logit of the marked 3s by a lot
    cleaned = flat[marked].reshape(-1, 8, 8).copy()
    cleaned[(slice(None), *MARK)] = 0.0
    drop = logits(flat[marked])[:, CLASS] - logits(cleaned.reshape(-1, 64))[:, CLASS]
    assert drop.mean() > 3.0, drop.mean()

    params = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in
              (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "watermark_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "watermark.onnx")

    images, truth = folder / "images", {}
    images.mkdir()
    picks = (("marked", np.flatnonzero(marked)[:30]), ("clean", np.flatnonzero((y == CLASS) & ~marked)[:30]),
             ("five", np.flatnonzero(y == 5)[:20]))
    for kind, rows in picks:
        for i in rows:
            Image.fromarray(np.round(x[i] * 255).astype(np.uint8), "L").save(images / f"{kind[0]}{i}.png")
            truth[f"{kind[0]}{i}"] = kind
    return folder / "watermark.onnx", images, truth


@pytest.fixture(scope="module")
def watermark(tmp_path_factory):
    return _watermark_model(tmp_path_factory.mktemp("watermark"))


@pytest.fixture(scope="module")
def explained(watermark, tmp_path_factory):
    """The watermark dataset explained (top-1 targets, epsilon rule) with a manifest."""
    model, images, truth = watermark
    out = tmp_path_factory.mktemp("explained") / "out"
    code, _, err = run_cli("explain", model, "--images", images, "-o", out, "--manifest", "--rules", "epsilon",
                           "--no-progress", "--no-cache")
    assert code == 0, err
    return out, truth


def _clusters(summary: dict, truth: dict) -> list[Counter]:
    return [Counter(truth[Path(m["source"]).stem] for m in summary["members"] if m["cluster"] == c)
            for c in range(summary["clusters"])]


def test_audit_separates_the_watermark(explained, tmp_path):
    out, truth = explained
    code, stdout, err = run_cli("audit", out, "--class", CLASS, "-o", tmp_path / "audit.html",
                                "--json", tmp_path / "audit.json")
    assert code == 0, err
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert f"{summary['clusters']} clusters" in stdout
    members = Counter(truth[Path(m["source"]).stem] for m in summary["members"])
    assert members["marked"] == 30 and members["five"] == 0  # --class 3: the 3s (top-1 target), no fives
    assert summary["clusters"] >= 2
    # every cluster of the eigengap's choice is pure: the watermarked 3s never share one with clean 3s
    for counts in _clusters(summary, truth):
        assert max(counts.values()) / sum(counts.values()) >= 0.95, counts
    # asked for two clusters: the watermark is one of them
    code, _, err = run_cli("audit", out, "--class", CLASS, "--clusters", 2, "-o", tmp_path / "two.html",
                           "--json", tmp_path / "two.json")
    assert code == 0, err
    two = json.loads((tmp_path / "two.json").read_text())
    kinds = sorted(counts.most_common(1)[0][0] for counts in _clusters(two, truth))
    assert kinds == ["clean", "marked"]
    for counts in _clusters(two, truth):
        assert max(counts.values()) / sum(counts.values()) >= 0.95, counts
    page = (tmp_path / "audit.html").read_text()
    assert page.count("data:image/png;base64,") > summary["clusters"] and "<svg" in page
    assert "src='http" not in page and "src=\"http" not in page  # self-contained


def test_audit_errors(explained, tmp_path):
    out, _ = explained
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("a", "b", "c"):
        np.save(bare / f"{name}.npy", np.load(next(out.glob("*.npy"))))
    one_line_error(*run_cli("audit", bare, "--class", 3, "-o", tmp_path / "a.html")[::2], contains="manifest")
    one_line_error(*run_cli("audit", out, "--class", 7, "-o", tmp_path / "a.html")[::2], contains="at least 3")
    one_line_error(*run_cli("audit", tmp_path / "nope", "-o", tmp_path / "a.html")[::2], contains="no such")
    # without a manifest every .npy is audited
    code, stdout, err = run_cli("audit", bare, "-o", tmp_path / "b.html", "--clusters", 1)
    assert code == 0 and "3 maps, 1 clusters" in stdout, err


def test_manifest_error_rows_and_resume(watermark, tmp_path):
    model, images, _ = watermark
    folder = _first_images(images, tmp_path / "images", 4)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = ("explain", model, "--images", folder, "-o", out, "--manifest", "--rules", "epsilon", "--no-progress",
            "--no-cache")
    code, _, err = run_cli(*args)
    assert code == 2 and "1 of 5 images could not be read" in err and "manifest.jsonl" in err, err
    _, *rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]  # (a header first)
    assert len(rows) == 5
    assert {Path(r["source"]).name for r in rows} == {p.name for p in folder.iterdir()}
    (bad,) = [r for r in rows if r["status"] == "error"]
    assert bad["source"].endswith("broken.png") and "cannot read image" in bad["error"]
    for r in rows:
        if r["status"] == "ok":
            assert (out / r["relevance"]).is_file() and (out / r["heatmap"]).is_file()
            assert r["target"].isdigit() and isinstance(r["score"], float)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    lost = next(r["relevance"] for r in rows if r["status"] == "ok")
    (out / lost).unlink()  # a lost output is redone, and the failed image is tried again
    code, stdout, err = run_cli(*args)
    assert code == 2, err
    assert "3 of 5 images done in an earlier run" in stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert set(after) == set(before)
    assert [n for n in after if after[n] != before.get(n)] == [lost]
    _, *rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and [r["status"] for r in rows[5:]] == ["error", "ok"]


def test_manifest_refuses_other_model_or_settings(watermark, tmp_path):
    model, images, _ = watermark
    folder = _first_images(images, tmp_path / "images", 3)
    out = tmp_path / "out"
    args = ("explain", "--images", folder, "-o", out, "--manifest", "--no-progress", "--no-cache")
    assert run_cli(*args[:1], model, *args[1:], "--rules", "epsilon")[0] == 0
    header, *rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert header["lrpc"] == lrpc.__version__ and len(rows) == 3
    assert header["model"]["sha256"] == hashlib.sha256(Path(model).read_bytes()).hexdigest()
    assert header["settings"]["rules"] == "epsilon" and header["settings"]["target"] == "top1"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    # other flags, another model: refused before anything is written, naming what differs
    code, _, err = run_cli(*args[:1], model, *args[1:], "--rules", "epsilon-plus", "--epsilon", 0.1)
    one_line_error(code, err, contains="--epsilon (1e-06, now 0.1); --rules (epsilon, now epsilon-plus)")
    assert "--no-resume" in err
    other = tmp_path / "other.onnx"
    onnx_model = onnx.load(str(model))
    onnx_model.doc_string = "another model"
    onnx.save(onnx_model, str(other))
    code, _, err = run_cli(*args[:1], other, *args[1:], "--rules", "epsilon")
    one_line_error(code, err, contains="the model (sha256 ")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == stamps
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4
    # the same settings resume (the model file may have moved); --no-resume starts over: a new manifest
    moved = tmp_path / "moved.onnx"
    moved.write_bytes(Path(model).read_bytes())
    code, stdout, err = run_cli(*args[:1], moved, *args[1:], "--rules", "epsilon")
    assert code == 0 and "3 of 3 images done in an earlier run" in stdout, err
    code, _, err = run_cli(*args[:1], other, *args[1:], "--rules", "epsilon-plus", "--no-resume")
    assert code == 0, err
    header, *rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert header["settings"]["rules"] == "epsilon-plus" and header["model"]["file"] == str(other)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.glob("*.npy"))
    # a manifest without a header (an older lrpc) is not resumed either; --no-resume needs a manifest
    (out / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    one_line_error(*run_cli(*args[:1], other, *args[1:], "--rules", "epsilon-plus")[::2],
                   contains="records no model or settings")
    one_line_error(*run_cli("explain", other, "--images", folder, "-o", tmp_path / "plain", "--no-resume")[::2],
                   contains="--no-resume goes with --images and --manifest")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray on 2 CPUs for this module (the CLI connects to it by address)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _digit_images(folder: Path, corrupt: bool = True) -> Path:
    """The 16 shipped digits samples as 8x8 PNGs (and a corrupt one)."""
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(np.load(DIGITS_SAMPLES)["images"]):
        Image.fromarray(np.round(image[0] * 255).astype(np.uint8), "L").save(folder / f"d{i:02}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_ray_cli_matches_single_process_and_resumes(ray_cluster, tmp_path):
    images = _digit_images(tmp_path / "images")
    single, distributed = tmp_path / "single", tmp_path / "ray"
    flags = ("--images", images, "--batch-size", 4, "--rules", "epsilon-gamma-box", "--overlay", "--no-progress",
             "--no-cache")
    code, _, err = run_cli("explain", DIGITS, "-o", single, *flags)
    assert code == 2, err
    address = ray_cluster.get_runtime_context().gcs_address
    code, _, err = run_cli("explain", DIGITS, "-o", distributed, "--ray", address, "--ray-actors", 2, *flags)
    assert code == 2 and "1 of 17 images could not be read" in err, err
    # the same files, bit for bit (relevance, heatmaps with overlays), and a manifest row for every image
    names = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in distributed.iterdir()) == sorted(names + ["manifest.jsonl"])
    for name in names:
        assert (single / name).read_bytes() == (distributed / name).read_bytes(), name
    _, *rows = [json.loads(line) for line in (distributed / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in rows) == sorted(p.name for p in images.iterdir())
    (bad,) = [r for r in rows if r["status"] == "error"]
    assert bad["source"].endswith("broken.png") and "cannot read image" in bad["error"]
    labels = np.load(DIGITS_SAMPLES)["labels"]
    assert sum(r["target"] == str(labels[int(Path(r["source"]).stem[1:])]) for r in rows if r["status"] == "ok") >= 15
    # a second run explains only what is missing: the broken image again and a deleted output
    (distributed / "d03.npy").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in distributed.glob("*.npy")}
    code, stdout, err = run_cli("explain", DIGITS, "-o", distributed, "--ray", address, *flags)
    assert code == 2, err
    assert "15 of 17 images done in an earlier run" in stdout
    assert (distributed / "d03.npy").read_bytes() == (single / "d03.npy").read_bytes()
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in distributed.glob("*.npy") if p.name != "d03.npy")


def test_ray_dataset_api(ray_cluster, tmp_path):
    import lrpc.ray
    from lrpc.explain import prepare
    from lrpc.preprocess import load_image

    images = _digit_images(tmp_path / "images", corrupt=False)
    ds = ray_cluster.data.read_images(str(images), include_paths=True, mode="L")
    out = lrpc.ray.explain(ds, DIGITS, rules="epsilon-gamma-box", target="top1", batch_size=4, concurrency=1,
                           low_memory=True)  # (the actors' sessions: same relevance to rounding)
    rows = sorted(out.take_all(), key=lambda r: r["path"])
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in images.iterdir())
    session, spec = prepare(DIGITS, "epsilon-gamma-box", seed="top1", low=0.0, high=1.0)
    for r in rows:
        x, _ = load_image(r["path"], spec.size, spec.channels)
        e = session.explain(x)
        assert r["error"] == "" and r["target"] == str(int(e.target[0]))
        assert r["score"] == pytest.approx(float(e.output[0, e.target[0]]), rel=1e-6)
        assert r["relevance"].shape == (1, 8, 8)
        np.testing.assert_allclose(r["relevance"], e.relevance[0], rtol=1e-5, atol=1e-7)
    # Parquet shards of the output are what lrpc audit reads too
    out.write_parquet(str(tmp_path / "shards"))
    from lrpc.audit import audit

    result = audit(tmp_path / "shards", clusters=2)
    assert len(result["rows"]) == 16 and set(result["labels"]) == {0, 1}
    cls, count = Counter(r["target"] for r in rows).most_common(1)[0]  # (the 8s: 4 of the samples)
    assert count >= 3 and len(audit(tmp_path / "shards", cls=cls, clusters=1)["rows"]) == count
    # a row that is no image becomes an error row; the others are explained
    good = np.asarray(np.load(DIGITS_SAMPLES)["images"][0, 0, :, :, None] * 255, np.uint8).repeat(3, 2)  # RGB
    items = ray_cluster.data.from_items([{"image": good, "path": "good"},
                                         {"image": good[:, :, :1].repeat(5, 2), "path": "five-channels"}])
    rows = {r["path"]: r for r in lrpc.ray.explain(items, DIGITS, batch_size=2).take_all()}
    assert rows["good"]["error"] == "" and np.abs(rows["good"]["relevance"]).sum() > 0
    assert "uint8 image array" in rows["five-channels"]["error"] and not rows["five-channels"]["relevance"].any()
    # image files' bytes (read_binary_files) are decoded in the actors: a corrupt one is an error row naming its path
    broken = images / "broken.png"
    broken.write_bytes(b"not a png")
    files = ray_cluster.data.read_binary_files(str(images), include_paths=True)
    rows = {Path(r["path"]).name: r for r in lrpc.ray.explain(files, DIGITS, column="bytes", target="top1",
                                                               batch_size=4).take_all()}
    assert len(rows) == 17 and rows["broken.png"]["error"].startswith(f"{rows['broken.png']['path']}: ")
    assert "cannot read image" in rows["broken.png"]["error"] and not rows["broken.png"]["relevance"].any()
    decoded = {Path(r["path"]).name: r for r in out.take_all()}
    for name, r in decoded.items():
        assert rows[name]["error"] == "" and rows[name]["target"] == r["target"]
        np.testing.assert_array_equal(rows[name]["relevance"], r["relevance"])


def test_ray_actors_draw_the_files(ray_cluster, tmp_path, monkeypatch):
    import lrpc.explain

    images = _digit_images(tmp_path / "images", corrupt=False)
    flags = dict(images=images, batch_size=4, progress=False, log=lambda m: None, with_overlay=True,
                 relevance_dtype="float16", relevance_pool=2)
    single = lrpc.explain.run(DIGITS, tmp_path / "single", **flags)

    def no_drawing(*args):
        raise AssertionError("the driver draws")

    monkeypatch.setattr(lrpc.explain, "draw", no_drawing)  # (the driver's module; the actors import their own)
    distributed = lrpc.explain.run(DIGITS, tmp_path / "ray", ray="auto", concurrency=2, **flags)
    assert [p.name for p in distributed] == [p.name for p in single]
    for a, b in zip(single, distributed):
        assert a.read_bytes() == b.read_bytes(), a.name


def _run_and_kill_an_actor(ray, images: Path, out: Path) -> tuple[int, str | None]:
    """``lrpc explain --ray`` in a thread (batches of 1 image) while this thread kills (SIGKILL) the process of the
    Ray Data actor once 2 images are done. Returns (images in the manifest when it was killed, the run's error)."""
    import os
    import signal
    import threading
    import time

    from lrpc.errors import InputError
    from lrpc.explain import run

    result = {}

    def explain():
        try:
            run(DIGITS, out, images=images, batch_size=1, progress=False, log=lambda m: None, ray="auto")
        except InputError as err:
            result["error"] = str(err)

    thread = threading.Thread(target=explain)
    thread.start()
    manifest, killed_at = out / "manifest.jsonl", None
    while thread.is_alive() and killed_at is None:
        done = len(manifest.read_text().splitlines()) - 1 if manifest.is_file() else 0  # (after the header)
        if done >= 2:
            actors = [a for a in ray._private.state.actors().values()
                      if a["State"] == "ALIVE" and "_Explainer" in a["ActorClassName"]]
            if actors:
                os.kill(actors[0]["Pid"], signal.SIGKILL)
                killed_at = done
        time.sleep(0.01)
    thread.join()
    return killed_at, result.get("error")


def test_ray_actor_killed_mid_run(ray_cluster, tmp_path, monkeypatch):
    from PIL import Image

    import lrpc.ray

    images = tmp_path / "images"
    images.mkdir()
    samples = np.load(DIGITS_SAMPLES)["images"]
    for i in range(30):
        Image.fromarray(np.round(samples[i % 16, 0] * 255).astype(np.uint8), "L").save(images / f"d{i:02}.png")
    # restarted (the default): the killed actor's batch runs again, nothing is lost
    killed_at, error = _run_and_kill_an_actor(ray_cluster, images, tmp_path / "restarted")
    assert killed_at is not None and killed_at < 30 and error is None, (killed_at, error)
    _, *rows = [json.loads(line) for line in (tmp_path / "restarted" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(r["status"] == "ok" for r in rows)
    assert len(list((tmp_path / "restarted").glob("*.npy"))) == 30
    # no restarts left: the images not explained become error rows, and the run fails saying so
    monkeypatch.setattr(lrpc.ray, "MAX_RESTARTS", 0)
    killed_at, error = _run_and_kill_an_actor(ray_cluster, images, tmp_path / "lost")
    assert killed_at is not None and killed_at < 30, killed_at
    _, *rows = [json.loads(line) for line in (tmp_path / "lost" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in rows) == sorted(p.name for p in images.iterdir())
    failed = [r for r in rows if r["status"] == "error"]
    assert failed and all("ActorDiedError" in r["error"] for r in failed)
    assert error and f"{len(failed)} of 30 images failed ({len(failed)} in Ray" in error


def test_smaller_relevance_files(tmp_path):
    images = _digit_images(tmp_path / "images", corrupt=False)
    full, small = tmp_path / "full", tmp_path / "small"
    flags = ("--images", images, "--no-progress", "--no-cache")
    assert run_cli("explain", DIGITS, "-o", full, *flags)[0] == 0
    code, _, err = run_cli("explain", DIGITS, "-o", small, "--relevance-dtype", "float16", "--relevance-pool", 3,
                           *flags)
    assert code == 0, err
    assert "relevance stored as [1, 1, 3, 3] float16: 18 bytes per image (256 unpooled float32)" in err
    for p in full.glob("*.npy"):
        a, b = np.load(p), np.load(small / p.name)
        assert b.dtype == np.float16 and b.shape == (1, 1, 3, 3)  # 8x8 in blocks of 3: 3, 3 and 2 pixels
        np.testing.assert_allclose(b.astype(np.float64).sum(), a.sum(), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(b[0, 0, 0, 0], a[0, 0, :3, :3].sum(), rtol=2e-3, atol=1e-3)
        assert (small / p.with_suffix(".png").name).read_bytes() == (full / p.with_suffix(".png").name).read_bytes()
    code, _, err = run_cli("audit", small, "--clusters", 2, "-o", tmp_path / "audit.html")
    assert code == 0, err
    one_line_error(*run_cli("explain", DIGITS, "-o", small, "--relevance-pool", 0, *flags)[::2],
                   contains="--relevance-pool")


def test_audit_many_maps_sparse_graph(tmp_path):
    """Beyond DENSE_MAX maps the graph is a sparse k-nearest-neighbour one: a planted cluster of maps with a corner
    mark is found, and the audit's peak memory is a small part of the N x N float64 matrix of a dense graph, and of
    the maps themselves (read one at a time; only their downsampled features are kept)."""
    import tracemalloc

    from lrpc.audit import DENSE_MAX, audit, report

    n, planted = 2 * DENSE_MAX, 300
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(n):  # a blob near the centre; the planted ones also a mark in the top-right corner
        cy, cx = rng.uniform(2.5, 4.5, 2)
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) + 0.1 * rng.standard_normal((8, 8))
        if i < planted:
            m[MARK] += 1.5
        big = np.kron(m, np.ones((8, 8)))  # 64 x 64: area-averaged back to the 8 x 8 map by --size 8
        np.save(folder / f"{'p' if i < planted else 'c'}{i:05}.npy", big[None, None].astype(np.float32))
    import PIL.Image  # noqa: F401  (what the audit imports is not its memory)
    import scipy.sparse.linalg  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.neighbors  # noqa: F401

    tracemalloc.start()
    try:
        result = audit(folder, size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # all of the audit's memory (the rows, the features, the graph, the spectrum) is below an eighth of a dense graph's
    # N x N float64 matrix (128 MB; its eigendecomposition takes a few more of them) and of the maps read as float64
    assert peak < n * n * 8 / 8 and peak < n * 64 * 64 * 8 / 8, peak
    two = audit(folder, size=8, clusters=2)
    page = report(result)
    marked = np.array([Path(r["relevance"]).name.startswith("p") for r in result["rows"]])
    assert marked.sum() == planted and result["clusters"] >= 2
    found = 0
    for c in range(result["clusters"]):  # every cluster is (nearly) all marked or all clean maps
        share = marked[result["labels"] == c].mean()
        assert share >= 0.95 or share <= 0.05, (c, share)
        found += int(marked[result["labels"] == c].sum()) if share >= 0.95 else 0
    assert found >= 0.95 * planted
    assert sorted([int(marked[two["labels"] == c].sum()) for c in range(2)]) == [0, planted]
    assert sorted(np.bincount(two["labels"]).tolist()) == [planted, n - planted]
    assert page.count("<h2 style=") == result["clusters"]


def test_ray_actors_share_gpus():
    """Actors default to one per GPU, each asking one; more actors than GPUs share them (one reads or draws while
    another runs); without GPUs one actor; each gets its node's CPUs shared by the actors there as threads."""
    from lrpc.ray import _resources

    class Cluster:
        def __init__(self, gpus):
            self.gpus = gpus

        def cluster_resources(self):
            return {"CPU": 32.0, "GPU": float(self.gpus)} if self.gpus else {"CPU": 32.0}

        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": self.gpus / 2}}] * 2

    assert _resources(Cluster(4), None, None, None) == {"concurrency": 4, "num_cpus": 1, "num_gpus": 1, "threads": 8}
    assert _resources(Cluster(4), 12, None, None)["num_gpus"] == pytest.approx(1 / 3)
    assert _resources(Cluster(4), 10, None, None)["num_gpus"] == pytest.approx(1 / 3)  # (at most 3 on a GPU)
    assert _resources(Cluster(4), 2, None, None)["num_gpus"] == 1
    assert _resources(Cluster(4), 8, None, 1)["num_gpus"] == 1  # asked for: as asked
    assert _resources(Cluster(0), None, None, None) == {"concurrency": 1, "num_cpus": 1, "num_gpus": 0,
                                                        "threads": 16}


def _first_images(images, folder, n: int):
    """A new ``folder`` holding copies of the first ``n`` files of ``images``."""
    folder.mkdir()
    for p in sorted(images.iterdir())[:n]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder
