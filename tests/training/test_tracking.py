"""``training_config.report_to`` with the real clients, writing on this machine: TensorBoard event
files, MLflow's file store, W&B in offline mode. Each is read back with the client's own reader
(W&B's run file with its own record type) and must hold what ``metrics.jsonl`` holds: loss,
learning rate and lorafit's tokens/s at every logged step, and the resolved lorafit config.

One short run of the demo model reports to all three at once; no connection leaves the machine.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main
from lorafit.demo import train_file
from lorafit.errors import LorafitError
from lorafit.training.tracking import check_report_to, flat_params, prepare_trackers

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

STEPS = 3
TRACKER_ENV = (
    "TENSORBOARD_LOGGING_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_DISABLE_TELEMETRY",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_ERROR_REPORTING",
)


def _outside(address: object) -> bool:
    """Whether a socket address is off this machine (not a Unix socket, not loopback)."""
    if not isinstance(address, tuple):
        return False  # AF_UNIX: a path
    host = str(address[0])
    return not (host.startswith("127.") or host in ("::1", "localhost", "0.0.0.0"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A few demo steps reporting to TensorBoard, MLflow and W&B, with lorafit's defaults for where
    they write (the trackers' variables unset); any connection off the machine fails the run."""
    work = tmp_path_factory.mktemp("tracking")
    lines = train_file().read_text(encoding="utf-8").splitlines()
    (work / "train.jsonl").write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")
    attempts: list[object] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: object) -> None:
        if _outside(address):
            attempts.append(address)
            raise OSError(f"test: no connection off this machine ({address})")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        for name in TRACKER_ENV:
            mp.delenv(name, raising=False)  # put back as it was when the module's tests end
        mp.setenv("LORAFIT_CACHE", str(work / "cache"))
        mp.setattr(socket.socket, "connect", guarded)
        args = [
            "train",
            "--data.train",
            str(work / "train.jsonl"),
            "--data.max_length",
            "128",
            "--data.eval_prompts",
            "0",
            "--model.torch_dtype",
            "float32",
            "--training_config.max_steps",
            str(STEPS),
            "--training_config.logging_steps",
            "1",
            "--training_config.per_device_train_batch_size",
            "2",
            "--training_config.report_to",
            "[tensorboard, mlflow, wandb]",
            "--training_config.output_dir",
            str(work / "run"),
        ]
        assert main(args) == 0
    assert attempts == []
    return work / "run"


def logged(run: Path) -> dict[int, dict]:
    """``metrics.jsonl``'s training rows by step: what every tracker must show."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert all(r["tokens_per_s"] > 0 for r in by_step.values())
    return by_step


def test_tensorboard_events_hold_loss_lr_tokens_per_s_and_the_config(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = logged(run)
    for key, tag in (("loss", "train/loss"), ("learning_rate", "train/learning_rate")):
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx({s: r[key] for s, r in rows.items()}, rel=1e-6), tag
    got = {e.step: e.value for e in events.Scalars("train/tokens_per_s")}
    assert got == pytest.approx({s: r["tokens_per_s"] for s, r in rows.items()}, rel=1e-6)
    # text summaries are string tensors
    (text,) = events.Tensors("lorafit_config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    config = yaml.safe_load(shown.removeprefix("```yaml\n").removesuffix("```"))
    assert config == yaml.safe_load((run / "lorafit_run.yaml").read_text())
    assert config["model"]["name_or_path"] == "lorafit-demo"
    assert "args/text_summary" in events.Tags()["tensors"]  # transformers' TrainingArguments too


def test_mlflow_file_store_holds_loss_lr_tokens_per_s_and_the_config(run) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (found,) = client.search_runs(experiment_ids=["0"])
    assert found.info.status == "FINISHED"
    rows = logged(run)
    for key in ("loss", "learning_rate", "tokens_per_s"):
        history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert history == pytest.approx({s: r[key] for s, r in rows.items()}, rel=1e-6), key
    resolved = yaml.safe_load((run / "lorafit_run.yaml").read_text())
    params = found.data.params
    assert params["lorafit.model.name_or_path"] == "lorafit-demo"
    assert params["lorafit.peft_config.r"] == str(resolved["peft_config"]["r"])
    assert params["lorafit.training_config.max_steps"] == str(STEPS)
    assert params["learning_rate"] == str(resolved["training_config"]["learning_rate"])  # transformers'
    artifact = Path(client.download_artifacts(found.info.run_id, "lorafit_run.yaml"))
    assert yaml.safe_load(artifact.read_text()) == resolved


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``), parsed with wandb's own ``Record``.

    The file is W&B's header (``:W&B``, a 2-byte key, a version byte) then a LevelDB-style log:
    32 KiB blocks of chunks, each a 7-byte header (crc32, length, kind: 1 whole, 2 first,
    3 middle, 4 last) and its bytes; a block's last 6 bytes or fewer are padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_loss_lr_tokens_per_s_and_the_config(run) -> None:
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = []
    config: dict = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.append(items)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    rows = logged(run)
    train = {h["train/global_step"]: h for h in history if "train/loss" in h}
    assert sorted(train) == sorted(rows)
    for key in ("loss", "learning_rate", "tokens_per_s"):
        got = {s: h[f"train/{key}"] for s, h in train.items()}
        assert got == pytest.approx({s: r[key] for s, r in rows.items()}, rel=1e-6), key
    assert config["lorafit"] == yaml.safe_load((run / "lorafit_run.yaml").read_text())
    assert config["max_steps"] == STEPS  # transformers' TrainingArguments too
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished


def test_a_tracker_not_installed_says_how_to_install_it(monkeypatch) -> None:
    for name, package in (("wandb", "wandb"), ("mlflow", "mlflow-skinny"), ("tensorboard", "tensorboard")):
        monkeypatch.setitem(sys.modules, name, None)  # what an install without it finds
        with pytest.raises(LorafitError, match=f"{name} is not installed; pip install {package} "):
            check_report_to(["tensorboard", name] if name != "tensorboard" else name)
        monkeypatch.delitem(sys.modules, name)


def test_train_refuses_a_missing_tracker_before_loading_anything(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = tmp_path / "run"
    code = main(["train", "--training_config.report_to", "wandb", "--training_config.output_dir", str(run)])
    assert code != 0
    assert "pip install wandb" in capsys.readouterr().err
    assert not run.exists()


def test_an_unknown_tracker_is_named_with_the_nearest() -> None:
    with pytest.raises(LorafitError, match="unknown tracker 'tensorbord'.*did you mean 'tensorboard'"):
        check_report_to("tensorbord")
    assert check_report_to("none") == [] and check_report_to(["none"]) == []
    assert check_report_to("mlflow") == ["mlflow"]
    assert {"tensorboard", "mlflow", "wandb"} <= set(check_report_to("all"))  # all installed here


def test_where_the_user_points_a_tracker_wins(tmp_path, monkeypatch) -> None:
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    prepare_trackers(["mlflow", "wandb"], tmp_path / "a")
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path / "a")
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "a" / "mlruns").as_uri()
    prepare_trackers(["mlflow", "wandb"], tmp_path / "b")  # lorafit's own defaults follow the run
    assert os.environ["WANDB_DIR"] == str(tmp_path / "b")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    prepare_trackers(["mlflow", "wandb"], tmp_path / "c", logging_dir=str(tmp_path / "tb"))
    assert os.environ["WANDB_MODE"] == "online" and os.environ["WANDB_DIR"] == str(tmp_path / "mine")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb")
    import mlflow

    assert mlflow.get_tracking_uri() == "http://127.0.0.1:5000"
    mlflow.set_tracking_uri(None)


def test_flat_params_names_each_leaf() -> None:
    flat = flat_params({"model": {"name_or_path": "m", "quantization": None}, "peft_config": {"r": 8}})
    assert flat == {
        "lorafit.model.name_or_path": "m",
        "lorafit.model.quantization": "None",
        "lorafit.peft_config.r": "8",
    }
