"""The few CUDA calls the TensorRT backend makes, through pycuda (the package of record) or
NVIDIA's cuda-python, behind one small interface.

Buffers are allocated once per engine: pinned host memory (so copies can be asynchronous) and
device memory; copies and execution go on one stream, and two events around the execution give
the device time of an inference, not the wall time around Python. pycuda keeps a context per
thread, so every call runs inside ``active()`` (the pipeline calls ``infer`` from its own
thread); cuda-python's runtime API uses the device's primary context in every thread.
Imported only by the TensorRT backend; neither package is needed anywhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from agent.contract.errors import BackendUnavailable

CUDA_PACKAGES = ("pycuda", "cuda-python")


class CudaDevice(Protocol):
    name: str
    compute_capability: str  # "8.7"
    package: str

    def active(self) -> contextlib.AbstractContextManager[None]: ...

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray: ...

    def device_buffer(self, nbytes: int) -> int: ...

    @property
    def stream(self) -> int: ...

    def to_device(self, device: int, host: np.ndarray) -> None: ...

    def to_host(self, host: np.ndarray, device: int) -> None: ...

    def mark(self, which: str) -> None: ...

    def synchronize(self) -> float:
        """Wait for the stream; the milliseconds between the ``start`` and ``end`` marks."""
        ...

    def close(self) -> None: ...


def open_device(index: int = 0, package: str = "auto") -> CudaDevice:
    """GPU ``index`` through ``package`` (auto: pycuda, else cuda-python).

    Raises:
        BackendUnavailable: neither package imports, or there is no such GPU.
    """
    wanted = CUDA_PACKAGES if package == "auto" else (package,)
    reasons = []
    for name in wanted:
        try:
            return PycudaDevice(index) if name == "pycuda" else CudaRuntimeDevice(index)
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
    raise BackendUnavailable(
        "the tensorrt backend needs pycuda or cuda-python for GPU memory and streams ("
        + "; ".join(reasons)
        + ")"
    )


class PycudaDevice:
    package = "pycuda"

    def __init__(self, index: int) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        cuda.init()
        if index >= cuda.Device.count():
            raise BackendUnavailable(
                f"no CUDA device {index} (this machine has {cuda.Device.count()})"
            )
        device = cuda.Device(index)
        self.name = device.name()
        major, minor = device.compute_capability()
        self.compute_capability = f"{major}.{minor}"
        self._context = device.retain_primary_context()
        self._owned: list[Any] = []
        with self.active():
            self._stream = cuda.Stream()
            self._events = {"start": cuda.Event(), "end": cuda.Event()}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self._cuda.pagelocked_empty(shape, dtype)

    def device_buffer(self, nbytes: int) -> int:
        allocation = self._cuda.mem_alloc(max(nbytes, 1))
        self._owned.append(allocation)
        return int(allocation)

    @property
    def stream(self) -> int:
        return self._stream.handle

    def to_device(self, device: int, host: np.ndarray) -> None:
        self._cuda.memcpy_htod_async(device, host, self._stream)

    def to_host(self, host: np.ndarray, device: int) -> None:
        self._cuda.memcpy_dtoh_async(host, device, self._stream)

    def mark(self, which: str) -> None:
        self._events[which].record(self._stream)

    def synchronize(self) -> float:
        self._stream.synchronize()
        return float(self._events["start"].time_till(self._events["end"]))

    def close(self) -> None:
        with self.active():
            for allocation in self._owned:
                allocation.free()
        self._owned.clear()
        self._context.detach()


class CudaRuntimeDevice:
    package = "cuda-python"

    def __init__(self, index: int) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self._rt = cudart
        self._check(cudart.cudaSetDevice(index), f"CUDA device {index}")
        props = self._check(cudart.cudaGetDeviceProperties(index), "device properties")
        self.name = props.name.decode(errors="replace").strip("\0") if isinstance(
            props.name, bytes) else str(props.name)  # fmt: skip
        self.compute_capability = f"{props.major}.{props.minor}"
        self._stream = self._check(cudart.cudaStreamCreate(), "a stream")
        self._events = {
            k: self._check(cudart.cudaEventCreate(), "an event") for k in ("start", "end")
        }
        self._owned: list[int] = []
        self._pinned: list[int] = []

    def _check(self, result: Any, what: str) -> Any:
        status, *values = result if isinstance(result, tuple) else (result,)
        if int(status) != 0:
            raise BackendUnavailable(f"CUDA could not provide {what}: {status}")
        return values[0] if values else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pointer = self._check(self._rt.cudaMallocHost(max(nbytes, 1)), "pinned memory")
        self._pinned.append(pointer)
        buffer = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_byte * nbytes).from_address(pointer))
        return buffer.view(dtype).reshape(shape)

    def device_buffer(self, nbytes: int) -> int:
        pointer = self._check(self._rt.cudaMalloc(max(nbytes, 1)), "device memory")
        self._owned.append(pointer)
        return int(pointer)

    @property
    def stream(self) -> int:
        return int(self._stream)

    def to_device(self, device: int, host: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(device, host.ctypes.data, host.nbytes, kind,
                                             self._stream), "a copy to the device")  # fmt: skip

    def to_host(self, host: np.ndarray, device: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, kind,
                                             self._stream), "a copy to the host")  # fmt: skip

    def mark(self, which: str) -> None:
        self._check(self._rt.cudaEventRecord(self._events[which], self._stream), "an event")

    def synchronize(self) -> float:
        self._check(self._rt.cudaStreamSynchronize(self._stream), "a stream sync")
        return float(self._check(
            self._rt.cudaEventElapsedTime(self._events["start"], self._events["end"]), "a time"
        ))  # fmt: skip

    def close(self) -> None:
        for pointer in self._owned:
            self._rt.cudaFree(pointer)
        for pointer in self._pinned:
            self._rt.cudaFreeHost(pointer)
        self._owned.clear()
        self._pinned.clear()
