"""The profiler against hand counts: FLOPs of known layers, parameters, the median, peak live-tensor memory."""
import json
import statistics

import pytest
import torch
import torch.nn as nn

from attnlab import create_model
from attnlab.errors import AttnlabError
from attnlab.measure import (count_flops, count_params, input_shape, measure_latency, measure_peak_memory,
                             profile_model)
from attnlab.profiler import write_json


def test_conv_flops_equal_the_hand_count():
    # One 3x3 conv, 3 -> 8 channels, on 10x12 with padding 1: 2 * Cin * Cout * k * k * H * W per image.
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (10, 12)) == 2 * 3 * 8 * 3 * 3 * 10 * 12
    assert count_flops(conv, (10, 12), batch_size=4) == 4 * 2 * 3 * 8 * 3 * 3 * 10 * 12
    # Stride 2 halves both output sides: 5 x 6 outputs.
    strided = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    assert count_flops(strided, (10, 12)) == 2 * 3 * 8 * 9 * 5 * 6


def test_small_net_flops_count_only_conv_and_linear():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5))
    # 1x1 conv on 8x8: 2*3*4*64; linear: 2*4*5. BN, ReLU, sigmoid and pooling count 0.
    assert count_flops(net, 8) == 2 * 3 * 4 * 64 + 2 * 4 * 5
    # ResNet-20 (option A: no shortcut convs) at 32x32, MACs by hand: stem 3*16*9*32^2; stage 1: six 16->16 3x3
    # convs at 32^2; stages 2 and 3: one Cin->2Cin conv at stride 2 and five 2Cin->2Cin convs; the 64->10 fc.
    macs = (3 * 16 * 9 * 32 ** 2 + 6 * 16 * 16 * 9 * 32 ** 2
            + 16 * 32 * 9 * 16 ** 2 + 5 * 32 * 32 * 9 * 16 ** 2
            + 32 * 64 * 9 * 8 ** 2 + 5 * 64 * 64 * 9 * 8 ** 2 + 64 * 10)
    assert count_flops(create_model("resnet20"), 32) == 2 * macs  # 40.55 MMACs


def test_count_flops_keeps_training_mode_and_device():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    count_flops(net, 8)
    assert net.training
    assert net[1].num_batches_tracked.item() == 0  # counted in eval mode: BN statistics untouched


def test_count_params_counts_shared_modules_once():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2, bias=False))
    assert count_params(net) == 4 * 4 + 4 + 4 * 2
    assert count_params(create_model("resnet20")) == 269_722


def test_latency_dict_is_the_median_of_its_runs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).train()
    lat = measure_latency(model, 16, batch_size=3, warmup=1, repeats=5)
    assert {"median_ms", "images_per_s", "times_ms", "min_ms", "batch_size", "warmup", "repeats"} <= set(lat)
    assert len(lat["times_ms"]) == 5 and all(t > 0 for t in lat["times_ms"])
    assert lat["median_ms"] == statistics.median(lat["times_ms"])
    assert lat["images_per_s"] == pytest.approx(3 / (lat["median_ms"] / 1e3))
    assert lat["min_ms"] <= lat["median_ms"]
    assert model.training
    # Default counts are cut short by the time budget, but never below 3 passes; explicit counts are exact.
    capped = measure_latency(model, 16, batch_size=1, warmup=0, max_seconds=0)
    assert capped["repeats"] == len(capped["times_ms"]) == 3
    assert len(measure_latency(model, 16, batch_size=1, warmup=0, repeats=4)["times_ms"]) == 4
    with pytest.raises(AttnlabError, match="repeats must be >= 1"):
        measure_latency(model, 16, batch_size=1, repeats=0)
    with pytest.raises(AttnlabError, match="batch size must be an integer >= 1, got 0$"):  # timed empty batches
        measure_latency(model, 16, batch_size=0, repeats=2)


def test_cpu_peak_memory_is_the_peak_of_live_activations():
    # Sequential frees each output once the next layer has run, so the peak is the largest pair alive:
    # conv1 out (8 ch) + conv2 out (16 ch) on 8x8 float32 = (8 + 16) * 64 * 4 bytes. Input and weights excluded.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1))
    mem = measure_peak_memory(net, 8, batch_size=1)
    assert mem["peak_bytes"] == (8 + 16) * 64 * 4
    assert measure_peak_memory(net, 8, batch_size=5)["peak_bytes"] == 5 * (8 + 16) * 64 * 4
    # An in-place ReLU adds nothing; an out-of-place one is a new tensor alive next to its input.
    inplace = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True))
    outplace = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    assert measure_peak_memory(inplace, 8, 1)["peak_bytes"] == 8 * 64 * 4
    assert measure_peak_memory(outplace, 8, 1)["peak_bytes"] == 2 * 8 * 64 * 4
    assert "CPU" in mem["method"]


def test_profile_model_json(tmp_path):
    model = create_model("resnet20", attention="se")
    result = profile_model(model, 32, batch_sizes=(1, 2), warmup=0, repeats=2)
    assert {"params", "flops", "macs", "flops_convention", "input_size", "device", "device_name", "threads",
            "torch", "latency", "peak_memory", "peak_memory_method"} <= set(result)
    assert result["params"] == count_params(model)
    assert result["flops"] == count_flops(model, 32) == 2 * result["macs"]
    assert "2 x MACs" in result["flops_convention"]
    assert result["input_size"] == [3, 32, 32]
    assert set(result["latency"]) == set(result["peak_memory"]) == {"1", "2"}
    assert all(len(lat["times_ms"]) == 2 for lat in result["latency"].values())
    assert 0 < result["peak_memory"]["1"]["peak_bytes"] < result["peak_memory"]["2"]["peak_bytes"]
    path = tmp_path / "sub" / "p.json"
    write_json(str(path), result)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temp file left behind


def test_input_shape_forms():
    assert input_shape(32) == (3, 32, 32)
    assert input_shape((20, 30)) == (3, 20, 30)
    assert input_shape((1, 20, 30)) == (1, 20, 30)
    for bad in (0, (3, 0, 4), "32", (1, 2, 3, 4)):
        with pytest.raises(AttnlabError, match="input size"):
            input_shape(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile():
    result = profile_model(create_model("resnet20"), 32, device="cuda", batch_sizes=(1, 8), warmup=1, repeats=3)
    assert result["device"].startswith("cuda")
    assert result["peak_memory"]["8"]["peak_bytes"] > result["peak_memory"]["1"]["peak_bytes"] > 0
