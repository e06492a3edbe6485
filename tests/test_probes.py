from agent.link.probes import SystemProbes, parse_rknpu_load, parse_tegrastats

# Recorded tegrastats lines from several JetPack releases.
JETPACK_4_NANO = (
    "RAM 2448/3964MB (lfb 2x4MB) SWAP 0/1982MB (cached 0MB) CPU [9%@1479,5%@1479,off,4%@1479] "
    "EMC_FREQ 0% GR3D_FREQ 12% PLL@33C CPU@35.5C PMIC@100C GPU@34.5C AO@40.5C thermal@35C "
    "POM_5V_IN 2253/2253 POM_5V_GPU 0/0 POM_5V_CPU 415/415"
)
JETPACK_5_ORIN = (
    "RAM 3154/30536MB (lfb 6209x4MB) SWAP 0/15268MB (cached 0MB) CPU [0%@729,3%@729,1%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 45%@[305,305] VIC_FREQ 729 APE 174 CV0@-256C CPU@45.875C "
    "SOC2@42.281C SOC0@43.312C CV1@-256C GPU@-256C tj@45.875C SOC1@42.5C CV2@-256C "
    "VDD_GPU_SOC 2393mW/2393mW VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 3016mW/3016mW"
)
JETPACK_6_ORIN_NANO = (
    "11-22-2026 12:00:00 RAM 2956/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [2%@1510,1%@1510,0%@1510,4%@1510,off,off] GR3D_FREQ 0% cpu@47.75C soc2@46.062C "
    "soc0@46.75C gpu@46.468C tj@47.75C soc1@46.562C VDD_IN 4840mW/4840mW "
    "VDD_CPU_GPU_CV 559mW/559mW VDD_SOC 1478mW/1478mW"
)


def test_tegrastats_jetpack_4():
    data = parse_tegrastats(JETPACK_4_NANO)
    assert data["ram_used_mb"] == 2448 and data["ram_total_mb"] == 3964
    assert data["gpu_util_percent"] == 12
    assert data["cpu_percent"] == 6.0  # the 'off' core is not counted as 0
    assert data["temperatures_c"]["gpu"] == 34.5
    assert data["power_mw"] == {"POM_5V_IN": 2253, "POM_5V_GPU": 0, "POM_5V_CPU": 415}


def test_tegrastats_jetpack_5_leaves_out_powered_off_sensors():
    data = parse_tegrastats(JETPACK_5_ORIN)
    assert data["gpu_util_percent"] == 45
    assert "gpu" not in data["temperatures_c"] and "cv0" not in data["temperatures_c"]
    assert data["temperatures_c"]["tj"] == 45.875
    assert data["power_mw"]["VDD_GPU_SOC"] == 2393


def test_tegrastats_jetpack_6():
    data = parse_tegrastats(JETPACK_6_ORIN_NANO)
    assert data["gpu_util_percent"] == 0  # idle is a real 0, because the line says so
    assert data["temperatures_c"]["gpu"] == 46.468
    assert data["power_mw"]["VDD_IN"] == 4840
    assert data["cpu_percent"] == 1.8


def test_tegrastats_noise_gives_nothing():
    assert parse_tegrastats("garbage line") == {}


def test_rknpu_load_per_core_and_single():
    assert parse_rknpu_load("NPU load:  Core0: 12%, Core1:  0%, Core2:  3%,\n") == {
        "load_percent": 5.0,
        "cores_percent": {"core0": 12, "core1": 0, "core2": 3},
    }
    assert parse_rknpu_load("NPU load: 25%") == {"load_percent": 25}
    assert parse_rknpu_load("") == {}


def test_unavailable_probes_are_absent_not_zero():
    probes = SystemProbes(enable_tegrastats=False)
    data = probes.read()
    available = probes.available()
    assert data["system"]["rss_bytes"] > 0
    assert data["system"]["threads"] >= 1 and data["system"]["open_fds"] >= 3
    for key, probe in (("gpus", "nvml"), ("npu", "rknpu")):
        assert (key in data) == available[probe]
    probes.close()
