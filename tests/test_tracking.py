"""--report-to: TensorBoard event files and an offline W&B run hold what metrics.jsonl and eval.jsonl hold; a missing
package is named at parse time. Needs the packages of requirements-dev.txt (skipped without them)."""

import importlib.util
import json

import pytest

from conftest import read_jsonl, run_script

RUN = ("--preset", "tiny", "--total-steps", "2", "--eval-every", "0", "--eval-limit", "4", "--eval-samples", "1",
       "--save-every", "0")


def need(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed (pip install -r requirements-dev.txt)")


@need("tensorboard")
def test_tensorboard_events_match_the_run_files(tmp_path, warm):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    run_script("kdrl.py", *RUN, "--report-to", "tensorboard", "--output-dir", str(out))
    ev = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = set(ev.Tags()["scalars"])
    rows = read_jsonl(out / "metrics.jsonl")
    for row in rows:
        for k, v in row.items():
            if k == "step":
                continue
            got = {e.step: e.value for e in ev.Scalars(k)}
            assert got[row["step"]] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    evals = read_jsonl(out / "eval.jsonl")
    assert evals and all(f"eval/{r['benchmark']}/mean_length" in tags for r in evals)
    final = {e.step: e.value for e in ev.Scalars("eval/tiny_add/avg@1")}
    assert final[2] == pytest.approx(next(r["avg@1"] for r in evals if r["benchmark"] == "tiny_add"))
    config = ev.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"kd_coef": 0.2' in config


def wandb_records(path):
    """The protobuf records of a .wandb run file: a LevelDB-style log of 32 KiB blocks after a 7-byte header, each
    record split into chunks (4-byte checksum, 2-byte length, 1-byte type: 1 whole, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2
    data, pos, part = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            yield rec
            part = b""


@need("wandb")
def test_wandb_offline_run_holds_the_metrics_evals_and_config(tmp_path, warm):
    out = tmp_path / "wb"
    run_script("kdrl.py", *RUN, "--report-to", "wandb", "--output-dir", str(out),
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert (out / "wandb_id.txt").read_text().strip() in run_file.name  # a --resume reuses this id
    history, config = {}, {}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    for row in read_jsonl(out / "metrics.jsonl"):
        for k, v in row.items():
            if k != "step":
                assert history[row["step"]][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    for r in read_jsonl(out / "eval.jsonl"):
        assert history[r["step"]][f"eval/{r['benchmark']}/avg@1"] == pytest.approx(r["avg@1"])
    assert config["args"]["kd_coef"] == 0.2 and config["world_size"] == 1


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_missing_tracking_package_is_named_before_anything_loads(tmp_path, kind):
    p = run_script("kdrl.py", *RUN, "--report-to", kind, "--output-dir", str(tmp_path / "x"), check=False,
                   hide=(kind,), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"pip install {kind}" in p.stderr and not (tmp_path / "x").exists()
