"""tix's own TensorBoard event files, byte for byte against tensorboardX's writer and protocol buffers (the oracle:
tensorboardX is a test dependency only, so `tix invert` does not import it, nor the torch it imports)."""

import struct

import pytest
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import RecordWriter, masked_crc32c

from train import tensorboard
from train.report import MetricsLog


def frames(data: bytes) -> list[bytes]:
    """The records of a TFRecord file, each checked against tensorboardX's checksums."""
    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(data[i:i + 8])
        body = data[i + 12:i + 12 + length]
        assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == masked_crc32c(body)
        out.append(body)
        i += 16 + length
    assert i == len(data)
    return out


def reference_event(wall_time, step, scalars=None, file_version=None) -> bytes:
    ev = event_pb2.Event(wall_time=wall_time, step=step)
    if file_version:
        ev.file_version = file_version
    if scalars:
        ev.summary.CopyFrom(summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]))
    return ev.SerializeToString()


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300_000, 2**40])
def test_events_are_the_bytes_tensorboardx_writes(tmp_path, step):
    scalars = {"loss": 0.125, "loss/<my-cat>": -3.5e-7, "lr": 1e30, "grad_norm": float("nan")}
    ours = tensorboard.record(tensorboard.event(1796300000.25, step, scalars=scalars))
    theirs = tmp_path / "theirs"
    writer = RecordWriter(str(theirs))
    writer.write(reference_event(1796300000.25, step, scalars))
    writer.close()
    assert ours == theirs.read_bytes()
    header = tensorboard.record(tensorboard.event(5.0, file_version="brain.Event:2"))
    assert header == tensorboard.record(reference_event(5.0, 0, file_version="brain.Event:2"))


def test_a_run_log_reads_back_as_tensorboard_events(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(1, {"loss": 0.5, "loss/<a>": 0.25})
    log.log(2, {"loss": 0.375})
    log.close()
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events = [event_pb2.Event.FromString(b) for b in frames(path.read_bytes())]
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert got == [(1, "loss", 0.5), (1, "loss/<a>", 0.25), (2, "loss", 0.375)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_checksum_is_crc32c():
    # The standard check value of CRC-32C (Castagnoli): the CRC of the ASCII digits 1 to 9.
    assert tensorboard.crc32c(b"123456789") == 0xE3069283
