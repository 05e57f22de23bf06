"""Which transport NCCL chose, read from recorded NCCL_DEBUG=INFO init output (the only fake:
there is no NCCL, GPU or EFA here), and the stop where EFA was required and sockets were chosen.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron_ext import nccl_net
from megatron_ext.exits import transient

# Two p5en.48xlarge (H200) nodes with aws-ofi-nccl 1.x: NVIDIA/nccl#1597's log.
ON_EFA = """\
8h200-2:6831:6840 [0] NCCL INFO NET/OFI Creating one domain per process
8h200-2:6831:6840 [0] NCCL INFO NET/OFI Support for global registrations: true
8h200-2:6831:6840 [0] NCCL INFO PROFILER/Plugin: Could not find: libnccl-profiler.so.
8h200-2:6831:6840 [0] NCCL INFO Using network Libfabric
8h200-3:6310:6318 [0] NCCL INFO NET/OFI Selected Provider is efa (found 16 nics)
8h200-3:6310:6318 [0] NCCL INFO NET/OFI NIC group 0 device #0 0000:56:00.0
"""
# The plugin not found (NVIDIA/nccl#1504's NET/Plugin lines), then sockets (a recorded
# two-GPU container run: "NET/Socket : Using", "Using network Socket").
ON_SOCKETS = """\
678c7278cb2d:26023:26023 [0] NCCL INFO NET/Plugin: No plugin found (libnccl-net.so)
678c7278cb2d:26023:26023 [0] NCCL INFO NET/Plugin: Plugin load returned 2 : libnccl-net.so: cannot open shared object file: No such file or directory : when loading libnccl-net.so
678c7278cb2d:26023:26023 [0] NCCL INFO NET/Plugin: Using internal network plugin.
3767c65d25c4:880:887 [0] NCCL INFO NET/IB : No device found.
3767c65d25c4:880:887 [0] NCCL INFO NET/Socket : Using [0]eth0:172.17.0.2<0>
3767c65d25c4:880:887 [0] NCCL INFO Using non-device net plugin version 0
3767c65d25c4:880:887 [0] NCCL INFO Using network Socket
"""
# aws-ofi-nccl before 1.8 named itself "AWS Libfabric"; libfabric's tcp provider is not EFA.
OLD_PLUGIN = "ip-10-1-2-3:71:71 [0] NCCL INFO Using network AWS Libfabric\n"
OFI_OVER_TCP = ("h:1:1 [0] NCCL INFO NET/OFI Selected Provider is tcp (found 1 nics)\n"
                "h:1:1 [0] NCCL INFO Using network Libfabric\n")


def test_the_transport_is_read_from_nccl_s_init_output() -> None:
    assert nccl_net.network(ON_EFA) == "Libfabric (efa)"
    assert nccl_net.network(ON_SOCKETS) == "Socket"
    assert nccl_net.network(OLD_PLUGIN) == "AWS Libfabric"
    assert nccl_net.network("NCCL version 2.27.7+cuda12.9\n") is None
    assert nccl_net.on_efa("Libfabric (efa)") and nccl_net.on_efa("AWS Libfabric")
    assert not nccl_net.on_efa("Socket") and not nccl_net.on_efa(nccl_net.network(OFI_OVER_TCP))


def test_sockets_where_efa_is_required_stop_the_job_for_good(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "megatron_ext.nccl_net")
    log = tmp_path / "nccl-rank0.1234.log"
    nccl_net.check(nccl_net.network(ON_EFA), require_efa=True, path=log)
    assert "NCCL network transport: Libfabric (efa)" in caplog.text
    with pytest.raises(nccl_net.NotOnEfa) as stop:
        nccl_net.check(nccl_net.network(ON_SOCKETS), require_efa=True, path=log)
    assert "NCCL uses Socket, not EFA (cluster.require_efa=true)" in str(stop.value)
    assert "/opt/amazon/ofi-nccl/lib" in str(stop.value) and str(log) in str(stop.value)
    assert not transient(stop.value)  # a rerun from the same image would choose sockets again
    nccl_net.check("Socket", require_efa=False, path=log)  # said, not fatal
    assert "NCCL network transport: Socket (not EFA)" in caplog.text


def test_rank_0_logs_nccl_s_init_lines_to_its_file_and_a_user_s_settings_win(
        tmp_path: Path) -> None:
    log = tmp_path / "nccl.log"
    assert nccl_net.debug_env({}, log) == {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET",
                                           "NCCL_DEBUG_FILE": str(log)}
    assert nccl_net.debug_env({"NCCL_DEBUG": "WARN"}, log)["NCCL_DEBUG"] == "INFO"
    mine = {"NCCL_DEBUG": "TRACE", "NCCL_DEBUG_SUBSYS": "ALL", "NCCL_DEBUG_FILE": "/x/%h.%p"}
    assert nccl_net.debug_env(mine, log) == {}
