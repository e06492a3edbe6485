"""A device booted with systemd as PID 1: a cached Debian image under systemd-nspawn.

The image (scripts/setup-device-image.sh) stays untouched: the device boots it read-only with a
tmpfs overlay (``--volatile=overlay``), so each boot starts as a freshly flashed board. It shares
the host's network, so the agent inside reaches the tests' mosquitto and nginx on 127.0.0.1.
Commands run inside with ``nsenter`` into the container's namespaces (no machined needed).

Two traps the host sets, both avoided here: nspawn is started inside a cgroup of its own made
under the test's (started from the host's root cgroup, the container's systemd would take over
every host process), and only what this class started is ever stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
AGENT_UNIT = "edge-agent.service"
# The CPU qemu emulates for the board: a Cortex-A76 (Raspberry Pi 5, RK3588's big cores), as
# scripts/setup-aarch64.sh does. qemu's default ("max", with SVE) sends ONNX Runtime down
# kernels that qemu emulates 10-30x slower: an INT8 inference took 100 s instead of 3-8 s.
EMULATED_CPU = "cortex-a76"
# What that CPU says in /proc/cpuinfo. Under qemu the kernel shows the host's x86 text there,
# which ONNX Runtime's aarch64 build cannot parse.
ARM_CPUINFO = (
    "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
    "crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
)


def arm_cpuinfo() -> str:
    """ARM_CPUINFO for each of this host's cores (qemu runs the guest's threads on them)."""
    return "".join(ARM_CPUINFO.format(n=n) for n in range(os.cpu_count() or 1))


class DeviceError(AssertionError):
    """The device did not do what was asked; the message carries its own account."""


def own_cgroups(name: str) -> list[Path]:
    """A child cgroup of this process's own, in every hierarchy that systemd uses."""
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            base = CGROUP_ROOT / "systemd"
        elif controllers == "":
            base = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
        else:
            continue
        folder = base / path.lstrip("/") / name
        folder.mkdir(parents=True, exist_ok=True)
        made.append(folder)
    return made


def remove_cgroups(folders: list[Path]) -> None:
    """Remove the cgroups (deepest first) once the container has left them."""
    for folder in folders:
        for child in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            folder.rmdir()


class Device:
    """One boot of an image; ``run`` executes a command inside, as root."""

    def __init__(self, image: Path, workdir: Path, arch: str, binds: dict[Path, str]) -> None:
        self.image, self.arch = image, arch
        self.name = f"edge-device-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.binds = dict(binds)
        self.console = workdir / "console.log"
        self.process: subprocess.Popen | None = None
        self.leader: int | None = None
        self.cgroups: list[Path] = []
        self.emulated = arch == "arm64" and os.uname().machine != "aarch64"
        if self.emulated:  # nspawn binds folders only: the file goes over /proc/cpuinfo at boot
            emulation = workdir / "emulation"
            emulation.mkdir(exist_ok=True)
            (emulation / "cpuinfo").write_text(arm_cpuinfo())
            self.binds[emulation] = "/run/emulation"

    # -- lifecycle -------------------------------------------------------------------------------
    def boot(self, timeout: float) -> Device:
        if shutil.which("systemd-nspawn") is None:
            raise DeviceError("systemd-nspawn not found: bash scripts/setup-device-image.sh")
        self.cgroups = own_cgroups(self.name)
        command = [
            "systemd-nspawn", "--quiet", "-D", str(self.image), "--volatile=overlay", "--boot",
            "--register=no", "--keep-unit", "--console=passive", f"--machine={self.name}",
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()),
        ]  # fmt: skip
        procs = [folder / "cgroup.procs" for folder in self.cgroups]

        def enter_own_cgroup() -> None:
            for path in procs:
                path.write_text(str(os.getpid()))

        with self.console.open("w") as console:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                preexec_fn=enter_own_cgroup,
            )
        self.leader = self._wait_for_leader(timeout)
        if self.emulated:
            cpuinfo = "/run/emulation/cpuinfo"
            mounted = lambda: self.run("test", "-f", cpuinfo, check=False).returncode == 0  # noqa: E731
            self.wait_until(mounted, timeout, "the container's mounts")
            self.run("mount", "--bind", cpuinfo, "/proc/cpuinfo")
            # a sandboxed service gets /proc afresh (ProtectKernelTunables=…): bind it there too
            self.write(
                f"/etc/systemd/system/{AGENT_UNIT}.d/emulation.conf",
                f"[Service]\nBindReadOnlyPaths={cpuinfo}:/proc/cpuinfo\n"
                f"Environment=QEMU_CPU={EMULATED_CPU}\n",
            )
        self.wait_until(lambda: self._system_state() in {"running", "degraded"}, timeout, "boot")
        return self

    def _wait_for_leader(self, timeout: float) -> int:
        """The container's PID 1: nspawn's child (its own pid namespace)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise DeviceError(f"systemd-nspawn exited {code}\n{self.log()}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return int(pids[0])
            time.sleep(0.1)
        raise DeviceError(f"no container started within {timeout:g} s\n{self.log()}")

    def _system_state(self) -> str:
        result = self.run("systemctl", "is-system-running", check=False, timeout=60)
        return result.stdout.strip()

    def shutdown(self, timeout: float = 120) -> None:
        """Power off (systemd stops every unit), or kill what we started. (Not SIGRTMIN+4 to
        PID 1: qemu-user does not pass that signal on to an emulated systemd.)"""
        if self.process is None:
            return
        try:
            if self.process.poll() is None and self.leader:
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=60)
                self.process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        finally:
            if self.process.poll() is None:
                if self.leader:  # PID 1 of a namespace: its death ends every process in it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                self.process.kill()
                self.process.wait(timeout=30)
            remove_cgroups(self.cgroups)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- inside ----------------------------------------------------------------------------------
    def run(
        self, *command: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command inside the device, as root, from its root directory."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
             "--", "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
             "LANG=C.UTF-8", f"QEMU_CPU={EMULATED_CPU}", *command],
            capture_output=True, text=True, timeout=timeout, input=input,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise DeviceError(
                f"on the device, {' '.join(command)} exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
            )
        return result

    def write(self, path: str, text: str, mode: str = "644") -> None:
        script = f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}' && chmod {mode} '{path}'"
        self.run("sh", "-c", script, input=text)

    def unit(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` of a unit: the properties asked for."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        return int(self.unit(unit, "MainPID")["MainPID"])

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout

    def wait_until(self, condition, timeout: float, what: str) -> None:
        """Wait for a condition on the device (never for a fixed time); fail with its journal."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise DeviceError(f"timed out after {timeout:g} s waiting for {what}\n{self.log()}")
            if self.process is not None and self.process.poll() is not None:
                raise DeviceError(f"the device stopped while waiting for {what}\n{self.log()}")
            time.sleep(0.5)

    def log(self) -> str:
        text = self.console.read_text(errors="replace")[-3000:] if self.console.exists() else ""
        if self.leader and self.process is not None and self.process.poll() is None:
            try:
                journal = self.run("journalctl", "--no-pager", "-n", "80", check=False, timeout=60)
                text += "\n--- journal ---\n" + journal.stdout
            except subprocess.TimeoutExpired:
                pass
        return text
