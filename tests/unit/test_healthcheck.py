"""slurm/healthcheck.sh run for real, with fake nvidia-smi, dmesg, journalctl and fi_info first
on PATH (the only things here that cannot exist). Their output is in the formats the real tools
print: NVIDIA's driver Xid lines (docs.nvidia.com/deploy/xid-errors) and ``fi_info -p efa -t
FI_EP_RDM`` on an EFA instance (one ``-rdm`` domain per device)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO

HEALTHY_SMI = "0, 81559, 0\n1, 81559, 0\n"  # --format=csv,noheader,nounits on an 80 GB H100
XID_79 = ("NVRM: Xid (PCI:0000:53:00): 79, pid='<unknown>', name=<unknown>, "
          "GPU has fallen off the bus.")
XID_13 = ("NVRM: Xid (PCI:0000:3b:00): 13, pid=2831, name=python, Graphics SM Warp Exception on "
          "(GPC 0, TPC 0, SM 0): Out Of Range Address")
NODE = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _stamped(seconds: float, message: str) -> str:
    """A kernel log line as dmesg and ``journalctl -o short-monotonic`` print it."""
    return f"[{seconds:12.6f}] {message}\n"


def _fi_info(devices: int) -> str:
    return "".join(f"provider: efa\n    fabric: efa\n    domain: rdmap{16 + i}s0-rdm\n"
                   "    version: 120.0\n    type: FI_EP_RDM\n    protocol: FI_PROTO_EFA\n"
                   for i in range(devices))


def _tool(bin_dir: Path, name: str, output: str, rc: int = 0) -> None:
    (bin_dir / f"{name}.out").write_text(output)
    script = bin_dir / name
    script.write_text(f"#!/bin/bash\ncat {bin_dir / (name + '.out')} >&{2 if rc else 1}\nexit {rc}\n")
    script.chmod(0o755)


def _healthcheck(tmp_path: Path, smi: str = HEALTHY_SMI, dmesg: str = "", dmesg_rc: int = 0,
                 journal: str = "", journal_rc: int = 1, fi_info: str | None = None,
                 efa: int = 0, window_s: int = 3600) -> subprocess.CompletedProcess:
    _tool(tmp_path, "nvidia-smi", smi)
    _tool(tmp_path, "dmesg", dmesg, dmesg_rc)
    _tool(tmp_path, "journalctl", journal, journal_rc)
    if fi_info is not None:
        _tool(tmp_path, "fi_info", fi_info)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin",
           "HEALTHCHECK_XID_WINDOW_S": str(window_s)}
    return subprocess.run(["bash", str(REPO / "slurm" / "healthcheck.sh"), "2", "80", str(efa)],
                          env=env, capture_output=True, text=True)


def test_healthcheck_names_the_node_and_the_fault(tmp_path: Path) -> None:
    assert _healthcheck(tmp_path).returncode == 0
    missing = _healthcheck(tmp_path, "0, 81559, 0\n")
    assert missing.returncode == 1
    assert f"healthcheck FAILED on {NODE}: 1 GPUs visible, expected 2" in missing.stderr
    ecc = _healthcheck(tmp_path, "0, 81559, 0\n1, 81559, 3\n")
    assert "GPU 1 has 3 uncorrected ECC errors" in ecc.stderr
    small = _healthcheck(tmp_path, "0, 40960, 0\n1, 81559, 0\n")
    assert "GPU 0 has 40960 MiB" in small.stderr


def test_a_recent_fatal_xid_fails_the_node_even_before_a_long_log(tmp_path: Path) -> None:
    now = _uptime()
    # More than a pipe buffer (64 KiB) after the Xid: `dmesg | grep -m1` under pipefail missed it.
    tail = "".join(_stamped(now - 1, f"eth0: link up {i}") for i in range(2000))
    result = _healthcheck(tmp_path, dmesg=_stamped(now - 5, XID_79) + tail)
    assert result.returncode == 1
    assert f"healthcheck FAILED on {NODE}: fatal GPU Xid 79" in result.stderr


def test_old_and_application_xids_pass_and_are_logged(tmp_path: Path) -> None:
    now = _uptime()
    window = max(1, int(now) - 50)  # the Xid at 1 s after boot is older than the window
    log = _stamped(1.0, XID_79) + _stamped(now - 5, XID_13)
    result = _healthcheck(tmp_path, dmesg=log, window_s=window)
    assert result.returncode == 0, result.stderr
    assert "informational Xid 13" in result.stdout and "Xid 79" not in result.stdout


def test_the_journal_is_read_where_dmesg_is_not_and_an_unreadable_log_warns(
        tmp_path: Path) -> None:
    denied = "dmesg: read kernel buffer failed: Operation not permitted\n"
    journal = _healthcheck(tmp_path, dmesg=denied, dmesg_rc=1, journal_rc=0,
                           journal=_stamped(_uptime() - 5, XID_79))
    assert journal.returncode == 1 and "fatal GPU Xid 79" in journal.stderr
    unreadable = _healthcheck(tmp_path, dmesg=denied, dmesg_rc=1, journal_rc=1,
                              journal="No journal files were opened due to insufficient "
                                      "permissions.\n")
    assert unreadable.returncode == 0
    assert (f"healthcheck WARNING on {NODE}: kernel log unreadable, Xid errors not checked "
            "(dmesg: read kernel buffer failed: Operation not permitted; journalctl: No journal"
            in unreadable.stderr)


def test_efa_devices_are_counted_where_efa_is_expected(tmp_path: Path) -> None:
    assert _healthcheck(tmp_path, fi_info=_fi_info(4), efa=4).returncode == 0
    short = _healthcheck(tmp_path, fi_info=_fi_info(3), efa=4)
    assert short.returncode == 1
    assert f"healthcheck FAILED on {NODE}: 3 EFA devices, expected 4" in short.stderr
    bare = tmp_path / "no-efa"
    bare.mkdir()
    absent = _healthcheck(bare, efa=4)
    assert absent.returncode == 1 and "fi_info not found" in absent.stderr
