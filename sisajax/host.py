"""The host a training program ran on: what decides whether its bits can be reproduced.

Bit-identity of retraining is promised for training states produced by the same program on the
same host. "Same host" here means the same values of everything that changes XLA's generated code
or numerics: jax and jaxlib versions, backend and device kind, the CPU architecture and the ISA
features XLA:CPU compiles for (AVX2, AVX-512, AMX, FMA, SVE, ...), and the XLA flags (minus the
forced host device count, which decides the layout, recorded separately, not the bits of a
``lax.map`` run). Every stored slice checkpoint names the host id of the program that wrote it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from typing import Any

# ISA features that change the code XLA:CPU (LLVM) generates for matrix and vector work.
ISA_FEATURES = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512cd",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    # arm64
    "asimd",
    "asimdhp",
    "fphp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
    "svebf16",
)
LAYOUT_FLAGS = ("--xla_force_host_platform_device_count",)


@functools.cache
def cpuinfo_first_block() -> dict[str, str]:
    """``{lower-case key: value}`` of the first processor's block of ``/proc/cpuinfo`` (empty
    where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "" and out:
                    break
                if key:
                    out.setdefault(key, value.strip())
    except OSError:
        pass
    return out


@functools.cache
def cpu_description() -> tuple[str, tuple[str, ...]]:
    """``(model name, sorted code-relevant ISA features)`` read from ``/proc/cpuinfo``."""
    info = cpuinfo_first_block()
    model = platform.processor() or platform.machine()
    named = info.get("model name") or info.get("cpu model")
    if named and model in ("", platform.machine()):
        model = named
    flags = set((info.get("flags") or info.get("features") or "").split())
    return model, tuple(sorted(flags.intersection(ISA_FEATURES)))


@functools.cache
def cpu_signature() -> str:
    """A sha256 of the CPU's model name and every feature flag ``/proc/cpuinfo`` lists (not only
    :data:`ISA_FEATURES`): a compiled program may use any feature the CPU reported when it was
    compiled, so a program kept on disk is only loaded on a CPU that reports the same."""
    info = cpuinfo_first_block()
    model = "|".join(
        [platform.processor() or platform.machine()]
        + [info.get(k, "") for k in ("model name", "cpu model", "cpu part", "cpu implementer")]
    )
    flags = sorted(set((info.get("flags") or info.get("features") or "").split()))
    return hashlib.sha256(f"{model}\0{' '.join(flags)}".encode()).hexdigest()


def code_flags(xla_flags: str | None = None, backend: str | None = None) -> list[str]:
    """The ``XLA_FLAGS`` tokens that can change generated code, sorted: layout flags dropped, and
    on a ``backend`` other than a GPU the ``--xla_gpu_*`` ones (which ``import sisajax`` adds
    everywhere, and which change no code there)."""
    tokens = (os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags).split()
    drop = (
        LAYOUT_FLAGS if backend in (None, "gpu", "cuda", "rocm") else (*LAYOUT_FLAGS, "--xla_gpu_")
    )
    return sorted(t for t in tokens if not t.startswith(drop))


def host_info() -> dict[str, Any]:
    """The current process's host description (see the module docstring)."""
    import jax
    import jaxlib

    model, isa = cpu_description()
    dev = jax.devices()[0]
    backend = jax.default_backend()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": backend,
        "device_kind": dev.device_kind,
        "machine": platform.machine(),
        "isa": list(isa),
        "xla_flags": code_flags(backend=backend),
        "cpu_model": model,
    }


IDENTITY_KEYS = ("jax", "jaxlib", "backend", "device_kind", "machine", "isa", "xla_flags")


def code_id() -> str:
    """A short id of what decides generated code that is known before jax's backend starts: jax
    and jaxlib versions, machine, ISA features and the code-relevant ``XLA_FLAGS``. It names the
    command line's compilation-cache folder, so choosing that folder starts no backend (a command
    may still choose its device layout after reading its run); jax's own cache keys add the
    backend and device kind."""
    import jax
    import jaxlib

    _, isa = cpu_description()
    return host_id(
        {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "machine": platform.machine(),
            "isa": list(isa),
            "xla_flags": code_flags(),
        }
    )  # backend and device kind unknown here


def host_id(info: dict[str, Any]) -> str:
    """A short id of the code-relevant part of a host description (``cpu_model`` excluded)."""
    ident = {k: info.get(k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def current() -> tuple[str, dict[str, Any]]:
    """``(host id, host description)`` of this process."""
    info = host_info()
    return host_id(info), info


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two host descriptions (code-relevant keys only)."""
    out = []
    for k in IDENTITY_KEYS:
        if a.get(k) != b.get(k):
            if k == "isa":
                x, y = set(a.get(k) or ()), set(b.get(k) or ())
                out.append(f"isa: {sorted(x - y)} vs {sorted(y - x)}")
            else:
                out.append(f"{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return out
