"""Timing and peak-memory probes for the benchmark (GPU: CUDA allocator; CPU: process resident set size).

CPU peak memory is the rise of the process's peak resident set size (VmHWM) over its resident size just before the
measured call. Before each measurement, freed heap memory is handed back to the OS (`malloc_trim(0)`) and the
kernel's peak counter is reset to the current RSS (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so each
configuration's number is its own peak and not a high-water mark left by an earlier one. Both steps run outside
timed regions.
"""

from __future__ import annotations

import ctypes
import os
import re
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Device-synchronised wall-clock timing: `with watch: ...` then `watch.seconds`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def fix_mmap_threshold(threshold: int = 1 << 16) -> bool:
    """Make glibc serve every allocation >= `threshold` bytes with its own mmap, returned to the OS on free.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, after which
    large tensors come from the heap and freed ones are recycled with fragmentation, so the resident set depends on
    what ran before. With a fixed threshold the resident set follows the live tensors. Call it first thing in a
    process that measures CPU memory."""
    _malloc_trim()
    if not _LIBC:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(_LIBC.mallopt(m_mmap_threshold, threshold)) and bool(_LIBC.mallopt(m_trim_threshold, threshold))


def cpu_peak_supported() -> tuple[bool, str]:
    """Whether the process peak RSS can be reset here (needs Linux /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True, "VmHWM reset via /proc/self/clear_refs after malloc_trim(0)"
    except OSError as exc:
        return False, f"cannot reset the peak RSS ({exc}); CPU peak memory not measured"


class MemoryProbe:
    """Peak memory of one call: `with probe: ...`, then `probe.peak_extra` (bytes above the memory in use when it
    started) and `probe.peak_total` (bytes in use at the peak: allocated tensors on GPU, process RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_extra: int | None = None
        self.peak_total: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._before = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.peak_total = peak
        self.peak_extra = max(0, peak - self._before)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_machine_note(device: torch.device, busy: float | None) -> str | None:
    """A warning when other processes already use CPU cores this run's threads need."""
    if device.type != "cpu" or busy is None:
        return None
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    if busy + threads <= cores + 0.3:
        return None
    free = max(1, int(cores - busy + 0.3))
    note = (f"other processes kept {busy:.1f} of {cores} cores busy just before the run, which uses {threads} torch "
            f"thread(s): timings are slower and noisier than on a quiet machine")
    if threads > free:
        note += (f"; with more threads than free cores, OpenMP threads wait on descheduled peers, which makes pruned "
                 f"runs (same operator count, fewer FLOPs) gain much less than they should — re-run on a quiet "
                 f"machine, or with --threads {free}")
    return note
