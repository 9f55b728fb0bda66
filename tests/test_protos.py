"""The control-plane protobuf stubs: checked in, current, importable and usable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from dsgd.config import TrainConfig
from dsgd.proto import control_pb2, control_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
STUB_DIR = ROOT / "dsgd" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated(directory: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.name.endswith(GENERATED_SUFFIXES)
    }


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    """Same command as scripts/gen_protos.sh, into a temporary directory."""
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("dsgd/proto/*.proto"))
    assert protos, "no .proto files under protos/dsgd/proto"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"

    fresh = _generated(tmp_path / "dsgd" / "proto")
    checked_in = _generated(STUB_DIR)
    assert len(fresh) == 3 * len(protos)
    stale = sorted(
        name for name in fresh.keys() | checked_in.keys() if fresh.get(name) != checked_in.get(name)
    )
    assert not stale, (
        f"generated protobuf stubs in dsgd/proto are stale or missing: {stale}; "
        "run scripts/gen_protos.sh and commit the result"
    )


def test_stubs_import_without_warnings() -> None:
    """pytest turns warnings into errors, so a gencode/runtime version skew shows up here."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import dsgd.proto.control_pb2_grpc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_proto_package_mirrors_the_python_package() -> None:
    assert control_pb2.DESCRIPTOR.name == "dsgd/proto/control.proto"
    assert control_pb2.DESCRIPTOR.package == "dsgd.v1"


def test_coordinator_service_methods() -> None:
    service = control_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {
        "RegisterShard",
        "FetchInitialShard",
        "RegisterWorker",
        "UploadInitial",
        "RegisterEvaluator",
        "ReportEvaluation",
        "Heartbeat",
        "Status",
        "Shutdown",
        "SaveCheckpoint",
    }
    # checkpoint and initial-value bytes stream in chunks, never as one huge message
    assert methods["FetchInitialShard"].server_streaming
    assert methods["FetchInitialShard"].output_type.name == "TensorChunk"
    assert methods["SaveCheckpoint"].server_streaming
    shard = control_pb2.DESCRIPTOR.services_by_name["Shard"]
    assert [m.name for m in shard.methods] == ["Checkpoint"]
    assert shard.methods[0].server_streaming
    # only the initial parameters travel towards the coordinator in pieces
    assert [m.name for m in service.methods if m.client_streaming] == ["UploadInitial"]
    assert methods["UploadInitial"].input_type.name == "TensorChunk"
    with grpc.insecure_channel("127.0.0.1:1") as channel:  # never connects: no RPC is made
        stub = control_pb2_grpc.CoordinatorStub(channel)
        for name in methods:
            assert hasattr(control_pb2_grpc.CoordinatorServicer, name)
            assert callable(getattr(stub, name))
    assert callable(control_pb2_grpc.add_CoordinatorServicer_to_server)


def test_messages_round_trip() -> None:
    fingerprint = 2**63 - 1  # the layout fingerprint is 63 bits
    reply = control_pb2.RegisterWorkerReply(
        ready=True,
        worker_id=3,
        partition=1,
        num_partitions=4,
        config_json=TrainConfig().to_json(),
        shards=[
            control_pb2.ShardEndpoint(
                shard_id=k,
                data_address=f"tcp://127.0.0.1:{5000 + k}",
                pub_address=f"tcp://127.0.0.1:{6000 + k}",
                start=k * 10,
                stop=k * 10 + 10,
                incarnation=2**64 - 1,
            )
            for k in range(2)
        ],
    )
    parsed = control_pb2.RegisterWorkerReply.FromString(reply.SerializeToString())
    assert parsed == reply
    assert TrainConfig.from_json(parsed.config_json) == TrainConfig()
    assert [s.start for s in parsed.shards] == [0, 10]

    heartbeat = control_pb2.HeartbeatRequest(
        role=control_pb2.ROLE_WORKER,
        id=2,
        stats=control_pb2.MemberStats(version=5, step=7, rate=1.5, counters={"rejected": 2.0}),
    )
    parsed_hb = control_pb2.HeartbeatRequest.FromString(heartbeat.SerializeToString())
    assert parsed_hb.stats.counters["rejected"] == 2.0
    assert parsed_hb.role == control_pb2.ROLE_WORKER

    shard = control_pb2.RegisterShardRequest(shard_id=1, layout_fingerprint=fingerprint)
    parsed_shard = control_pb2.RegisterShardRequest.FromString(shard.SerializeToString())
    assert parsed_shard.layout_fingerprint == fingerprint

    chunk = control_pb2.TensorChunk(name="params", offset=0, total=4, data=b"\x00" * 16)
    assert control_pb2.TensorChunk.FromString(chunk.SerializeToString()).data == b"\x00" * 16


def test_fields_reject_values_out_of_range() -> None:
    with pytest.raises(ValueError):
        control_pb2.RegisterShardRequest(layout_fingerprint=-1)
    with pytest.raises(ValueError):
        control_pb2.RegisterShardRequest(shard_id=2**31)
