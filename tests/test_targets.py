"""Deployment targets: detection from recorded /proc/cpuinfo texts and devices, fallback rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import OtaConfig, build_config
from agent.contract import targets
from agent.contract.descriptor import INDEX_SCHEMA, ChannelIndex
from agent.updates import followed_target, following
from agent.updates.ota import choose
from tests.conftest import run_cli

CPUINFO = Path(__file__).parent / "data" / "cpuinfo"


def machine(tmp_path: Path, cpuinfo: str, model: str | None = None, tegra: bool = False) -> Path:
    """A fake root with a recorded /proc/cpuinfo and, optionally, a device tree and L4T file."""
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text((CPUINFO / cpuinfo).read_text())
    if model is not None:
        (tmp_path / "proc/device-tree/model").write_text(model + "\0")
    if tegra:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0")
    return tmp_path


@pytest.mark.parametrize(
    ("cpuinfo", "arch", "target", "cpu", "features"),
    [
        ("epyc-avx2.txt", "x86_64", "cpu-x86_64", "AMD EPYC 7B12", ("avx2", "fma")),
        (
            "xeon-avx512-vnni.txt",
            "x86_64",
            "cpu-x86_64-vnni",
            "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
            ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"),
        ),
        ("graviton2.txt", "aarch64", "cpu-aarch64", "Neoverse-N1", ("asimd", "asimddp")),
        ("pi5-cortex-a76.txt", "aarch64", "cpu-aarch64", "Cortex-A76", ("asimd", "asimddp")),
    ],
)
def test_cpu_targets_are_detected_from_the_flags_the_kernels_depend_on(
    tmp_path, cpuinfo, arch, target, cpu, features
):
    detected = targets.detect(machine(tmp_path, cpuinfo), arch)
    assert (detected.target, detected.arch, detected.cpu) == (target, arch, cpu)
    assert detected.features == features
    assert target in detected.describe() and features[0] in detected.describe()
    if arch == "x86_64":  # the generation, which the name alone may hide on a virtual machine
        assert detected.describe().startswith(f"{target} ({cpu}, family ")


@pytest.mark.parametrize("flag", ["avx_vnni", "amx_int8"])
def test_avx_vnni_and_amx_count_as_vnni(flag):
    text = (CPUINFO / "epyc-avx2.txt").read_text().replace(" avx2 ", f" avx2 {flag} ")
    assert targets.from_cpuinfo(text, "x86_64").target == "cpu-x86_64-vnni"


def test_a_jetson_orin_is_its_own_target_and_falls_back_to_aarch64(tmp_path):
    root = machine(tmp_path, "jetson-orin.txt", "NVIDIA Jetson AGX Orin Developer Kit", tegra=True)
    detected = targets.detect(root, "aarch64")
    assert detected.target == "jetson-orin" and detected.cpu == "Cortex-A78AE"
    assert detected.accelerators == ("jetson-orin",)
    assert targets.preferences("jetson-orin") == ["jetson-orin", "cpu-aarch64"]


def test_an_rk3588_board_is_found_by_its_device_tree(tmp_path):
    root = machine(tmp_path, "pi5-cortex-a76.txt")
    (root / "proc/device-tree/compatible").write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    assert targets.detect(root, "aarch64").target == "rk3588"
    assert targets.preferences("rk3588") == ["rk3588", "cpu-aarch64"]


@pytest.mark.parametrize(
    "detected, backend, follows",
    [
        ("rk3588", "rknn", "rk3588"),
        ("rk3588", "onnxruntime", "cpu-aarch64"),  # ONNX Runtime cannot run an .rknn
        ("jetson-orin", "tensorrt", "jetson-orin"),
        ("jetson-orin", "onnxruntime", "cpu-aarch64"),
        ("cpu-x86_64-vnni", "openvino", "cpu-x86_64-vnni"),  # CPU targets: any CPU backend
        ("cpu-x86_64", "openvino", "openvino"),  # then cpu-x86_64: never fewer variants
        ("cpu-x86_64", "onnxruntime", "cpu-x86_64"),
        ("cpu-riscv64", "onnxruntime", "cpu-riscv64"),
    ],
)
def test_a_device_follows_the_models_its_configured_backend_runs(detected, backend, follows):
    assert targets.for_backend(detected, backend) == follows


def test_a_missing_cpuinfo_still_names_the_architecture(tmp_path):
    detected = targets.detect(tmp_path, "amd64")
    assert detected.target == "cpu-x86_64" and detected.features == ()


def test_fallbacks_are_safe_only():
    assert targets.preferences("cpu-x86_64-vnni") == ["cpu-x86_64-vnni", "cpu-x86_64"]
    assert targets.preferences("cpu-x86_64") == ["cpu-x86_64"]  # never a VNNI model
    assert targets.preferences("cpu-aarch64") == ["cpu-aarch64"]
    # OpenVINO's CPU kernels without VNNI saturate like ONNX Runtime's: the 7-bit first layer
    assert targets.preferences("openvino") == ["openvino", "cpu-x86_64"]
    assert targets.preferences("cpu-riscv64") == ["cpu-riscv64"]
    with pytest.raises(targets.UnknownTarget, match="known: cpu-x86_64"):
        targets.get("cpu-x86")


def _index(*variant_sets: list[str]) -> ChannelIndex:
    variant = {"descriptor": "models/m/d.json", "model_length": 10}
    releases = [
        {"name": "m", "version": f"1.{i}.0", "variants": {t: variant for t in variants}}
        for i, variants in enumerate(variant_sets)
    ]
    return ChannelIndex.model_validate(
        {"schema": INDEX_SCHEMA, "channel": "stable", "releases": releases}
    )


def test_a_plain_avx2_device_never_takes_a_vnni_variant():
    vnni_only = _index(["cpu-x86_64-vnni"])
    assert choose(vnni_only, "m", "cpu-x86_64", "dev1", None, None, {}) is None
    both = _index(["cpu-x86_64", "cpu-x86_64-vnni"])
    _, target, _ = choose(both, "m", "cpu-x86_64", "dev1", None, None, {})
    assert target == "cpu-x86_64"


def test_a_vnni_device_prefers_its_own_variant_and_falls_back_to_plain_x86():
    both = _index(["cpu-x86_64", "cpu-x86_64-vnni"])
    _, target, _ = choose(both, "m", "cpu-x86_64-vnni", "dev1", None, None, {})
    assert target == "cpu-x86_64-vnni"
    plain = _index(["cpu-x86_64"])
    _, target, _ = choose(plain, "m", "cpu-x86_64-vnni", "dev1", None, None, {})
    assert target == "cpu-x86_64"


def test_edge_agent_target_prints_what_it_detected_and_what_the_device_follows(tmp_path):
    text = run_cli("target")
    assert text.returncode == 0 and text.stdout.startswith(f"detected: {targets.detect().target}")
    data = json.loads(run_cli("target", "--json").stdout)
    assert data["target"] == targets.detect().target
    assert data["runs"] == targets.preferences(data["target"])
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"model: {{path: {tmp_path / 'absent.onnx'}}}\nstate_dir: {tmp_path / 'state'}\n"
        "ota: {model_name: shop-door, target: cpu-aarch64, channel_name: beta}\n"
    )
    followed = json.loads(run_cli("target", "-c", str(config), "--json").stdout)
    assert followed["follows"] == {"line": "shop-door", "target": "cpu-aarch64", "channel": "beta"}
    assert followed["runs"] == ["cpu-aarch64"]
    assert "follows:  shop-door for cpu-aarch64" in run_cli("target", "-c", str(config)).stdout


RK3588 = targets.Detected("rk3588", "aarch64", "Cortex-A76", ("asimd",), ("rknpu",))


@pytest.mark.parametrize(
    ("backend", "explicit", "expected"),
    [("rknn", None, "rk3588"), ("onnxruntime", None, "cpu-aarch64"), ("rknn", "cpu-aarch64",
     "cpu-aarch64")],
    ids=["npu-backend", "cpu-backend-on-the-npu-board", "configured"],
)  # fmt: skip
def test_the_followed_target_is_the_detected_one_as_the_backend_runs_it(
    backend, explicit, expected
):
    ota = OtaConfig(target=explicit)
    assert followed_target(ota, backend, RK3588) == expected


def test_the_followed_line_is_the_configured_one_else_the_active_slots_else_the_base_models():
    from agent.updates.model_store import SlotRecord

    def config(**ota):
        return build_config({"model": {"path": "m.onnx", "backend": "rknn"}, "ota": ota})

    slot = SlotRecord(slot="a", path="/x", name="from-slot", version="1.0.0")
    base = lambda: "from-base"  # noqa: E731
    assert following(config(model_name="named"), slot, base, RK3588).line == "named"
    assert following(config(), slot, base, RK3588).line == "from-slot"
    assert following(config(), None, base, RK3588).line == "from-base"
    assert following(config(), None, base, RK3588).target == "rk3588"
