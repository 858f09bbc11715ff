"""Outputs are written atomically and never over an input: the model, its external data, a rule file, an inputs
archive, an image or a mask, under any name or link; special files (stdout, FIFOs, pipes) are written in place."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_helpers import DIGITS, ROOT, digest, one_line_error, run_cli, with_external_data


def _digits_inputs(path) -> Path:
    np.savez(path, input=np.zeros((1, 1, 8, 8), np.float32))
    return path


def test_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DIGITS.read_bytes())
    before = digest(src)
    code, _, err = run_cli("compile", src, "-o", src)
    one_line_error(code, err, contains="refusing to overwrite")
    assert digest(src) == before


def test_output_folder_missing(tmp_path):
    code, _, err = run_cli("compile", DIGITS, "-o", tmp_path / "no" / "o.onnx")
    one_line_error(code, err, contains="does not exist")


@pytest.mark.parametrize("case", ["external data", "rule file", "inputs archive", "report onto rules", "symlink"])
def test_no_output_overwrites_an_input_file(tmp_path, case):
    """Every file a command reads is protected, not just the model: its external data, a rule file, an --inputs
    archive (through any link); refused in one line, exit code 2, the file unchanged."""
    model = tmp_path / "m.onnx"
    model.write_bytes(DIGITS.read_bytes())
    rules = tmp_path / "r.json"
    rules.write_text('{"composite": "epsilon"}')
    inputs = _digits_inputs(tmp_path / "x.npz")
    if case == "external data":
        (tmp_path / "ext").mkdir()
        model = with_external_data(tmp_path / "ext")
        target, argv = tmp_path / "ext" / "weights.bin", ["compile", model, "-o", tmp_path / "ext" / "weights.bin"]
    elif case == "rule file":
        target, argv = rules, ["compile", model, "--rules", rules, "-o", rules]
    elif case == "inputs archive":
        target, argv = inputs, ["check", model, "--inputs", inputs, "--json", inputs]
    elif case == "report onto rules":
        target, argv = rules, ["check", model, "--rules", rules, "--junit", rules]
    else:
        (tmp_path / "link.onnx").symlink_to(model)
        target, argv = model, ["canonize", model, "-o", tmp_path / "link.onnx"]
    before = digest(target)
    code, _, err = run_cli(*argv)
    one_line_error(code, err, contains="refusing to overwrite an input file")
    assert digest(target) == before


def test_output_through_a_symlink_replaces_its_target(tmp_path):
    """A symbolic link at the output path stays a link; the file it points to gets the output."""
    (tmp_path / "real.onnx").write_bytes(b"old")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.onnx")
    code, _, err = run_cli("compile", DIGITS, "-o", tmp_path / "link.onnx")
    assert code == 0, err
    assert (tmp_path / "link.onnx").is_symlink()
    onnx.checker.check_model(onnx.load(str(tmp_path / "real.onnx")))


def test_output_onto_a_fifo_is_written_in_place(tmp_path):
    """A path that is not a regular file (a FIFO here; /dev/null, /dev/stdout alike) is written into, not
    replaced by a regular file."""
    import stat
    import threading

    from lrpc.atomic_write import write_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        write_atomic(b'{"ok": 1}', fifo)
    finally:
        if reader.is_alive() and stat.S_ISFIFO(os.stat(fifo).st_mode):
            reader.join(5)
        if reader.is_alive():  # (the pipe was replaced: let the reader's open return)
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert got == [b'{"ok": 1}']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("spelling", ["/dev/stdout", "/dev/../dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "log"])
def test_json_to_a_redirected_stdout_appends_in_place(tmp_path, spelling):
    """--json /dev/stdout (however spelled, or the log file itself) with stdout redirected into a file (>>): the
    report goes where stdout writes, after what was printed; the file is not replaced (a rename through
    /dev/stdout's link replaced it with the report alone)."""
    log = tmp_path / "log.txt"
    log.write_text("old\n")
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "check", str(DIGITS), "--rules", "epsilon", "--quiet",
                               "--json", str(log) if spelling == "log" else spelling],
                              stdout=out, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("old\nPASS  supported") and '"passed": true' in text


def test_inspect_never_overwrites_its_mask_file(tmp_path):
    mask = tmp_path / "mask.npy"
    np.save(mask, np.ones((16, 16), np.float32))
    before = digest(mask)
    code, _, err = run_cli("inspect", ROOT / "models" / "digits_unet.onnx", "--target", f"mask:{mask}", "--json", mask)
    one_line_error(code, err, contains="refusing to overwrite an input file (the target file)")
    assert digest(mask) == before


def test_output_to_a_full_non_blocking_pipe_waits_for_the_reader():
    """A descriptor inherited in non-blocking mode (a pipe to a slow reader) takes the output as it drains, instead
    of failing with "Resource temporarily unavailable" once the pipe is full."""
    import threading
    import time

    from lrpc.atomic_write import write_atomic

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    data = bytes(range(256)) * 4096  # 1 MiB, 16 pipe buffers
    got = bytearray()

    def drain():
        while len(got) < len(data):
            time.sleep(0.001)
            got.extend(os.read(read_end, 65536))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        write_atomic([data], f"/dev/fd/{write_end}")
        reader.join(30)
    finally:
        os.close(write_end)
        os.close(read_end)
    assert bytes(got) == data


def test_closed_output_pipe_ends_quietly():
    """``lrpc rules | head -1``: once the reader has gone, lrpc stops without an error message (exit 141, as a
    process ended by SIGPIPE)."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "rules"], stdout=write, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("exchange", [True, False])
def test_an_existing_output_is_replaced_whole(exchange, tmp_path, monkeypatch):
    """write_atomic onto an existing file: by exchanging the names (Linux) or by os.replace (elsewhere, or where
    the file system has no exchange): the new bytes, a plain open()'s permissions, no file left beside it, and a
    hard link of the old file keeps the old bytes (the old file is replaced, not written into)."""
    import os

    import lrpc.atomic_write as io

    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old" * 1000)
    os.link(out, tmp_path / "link")
    called = []
    real = io._exchange
    monkeypatch.setattr(io, "_exchange", lambda a, b: called.append(b) or real(a, b))
    io.write_atomic([b"new ", memoryview(b"bytes")], out)
    assert out.read_bytes() == b"new bytes" and (tmp_path / "link").read_bytes() == b"old" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert called == ([out] if sys.platform.startswith("linux") else [])
    if exchange and sys.platform.startswith("linux"):
        assert real(str(tmp_path / "link"), out)  # (this file system exchanges: the path above was taken)
        assert out.read_bytes() == b"old" * 1000
    io.write_atomic(b"fresh", tmp_path / "new.onnx")  # (no file there: a plain rename)
    assert (tmp_path / "new.onnx").read_bytes() == b"fresh"


def test_an_output_is_checked_against_the_inputs_in_one_stat(tmp_path, monkeypatch):
    """explain --images checks each output against every source: with the sources stat'ed once (protected()) each
    check is one stat, not one per source (2,000 images re-run took minutes)."""
    from lrpc import atomic_write as io

    sources = [tmp_path / f"{i}.png" for i in range(50)]
    for s in sources:
        s.write_bytes(b"x")
    read = io.protected([(s, "a source") for s in sources])
    (tmp_path / "out.png").write_bytes(b"y")
    calls = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a) or real(*a, **k))
    io.refuse_inputs(tmp_path / "out.png", read)
    assert len(calls) == 1
    with pytest.raises(io.InputError, match="refusing to overwrite an input file \\(a source\\)"):
        io.refuse_inputs(sources[7], read)


def test_the_standard_streams_are_their_descriptors_however_spelled():
    """/dev/stdin, /dev/stdout, /dev/stderr name descriptors 0, 1, 2 (not the file a link resolves to, which a write
    would replace), also as //dev/stdout or /dev/../dev/stdout; /dev/fd/N takes ASCII digits only."""
    from lrpc.atomic_write import _descriptor

    assert [_descriptor(Path(p)) for p in ("/dev/stdin", "/dev/stdout", "/dev/stderr")] == [0, 1, 2]
    assert _descriptor(Path("/dev/../dev/stdout")) == 1 and _descriptor(Path("//dev/stdout")) == 1
    assert _descriptor(Path("/dev/fd/\uff11")) is None
