"""torch.compile, torch.export and ONNX on the PyTorch scan (CPU, float32): outputs against eager at resolutions
other than the traced one, dynamic batch, height and width, and one static graph per new resolution."""

import onnxruntime  # requirements-test.txt: a missing install fails, it does not skip
import pytest
import torch

from conftest import modeling, randomize_batchnorm, tiny_config
from mambavision_tools import model_code

scan = model_code.load("selective_scan")

# Exports run at MambaVision-T's native 224 with T's windows (14 and 7): each windowed level holds exactly one window
# there, the case where a traced size of 1 would specialise the program. The other sizes hold several windows, pad
# them, or both, at each level, with another batch size.
EXPORTED = (2, 3, 224, 224)
OTHERS = [(1, 3, 320, 256), (3, 3, 200, 136)]  # 20x16 and 10x8 maps (2x2 windows, padded); 13x9 and 7x5 (one, padded)
COMPILED = (2, 3, 200, 136)  # both windowed levels of the tiny model pad their maps (13x9 -> 16x12 and 7x5 -> 8x6)
DYNAMIC = {"pixel_values": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}


@pytest.fixture(scope="module")
def model():
    """A tiny classifier with a mixer and an attention block at each windowed level."""
    torch.manual_seed(0)
    return randomize_batchnorm(modeling.MambaVisionModelForImageClassification(tiny_config(depths=[1, 1, 1, 2]))).eval()


@pytest.fixture(scope="module")
def t_windowed():
    """The tiny classifier with MambaVision-T's windows and a mixer and an attention block at each windowed level."""
    torch.manual_seed(0)
    config = tiny_config(depths=[1, 1, 2, 2], window_size=[8, 8, 14, 7])
    return randomize_batchnorm(modeling.MambaVisionModelForImageClassification(config)).eval()


def pixels(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def eager_logits(model, shape):
    with torch.no_grad():
        return model(pixels(shape)).logits


@pytest.fixture(scope="module")
def exported(t_windowed):
    """torch.export with dynamic batch, height and width, no switches."""
    return torch.export.export(t_windowed, (pixels(EXPORTED),), dynamic_shapes=DYNAMIC)


def test_export_at_one_window_per_level_runs_at_other_sizes(t_windowed, exported):
    assert len(exported.range_constraints) == 3, exported.range_constraints  # batch, height and width stayed symbolic
    for shape in [EXPORTED, *OTHERS]:
        with torch.no_grad():
            got = exported.module()(pixels(shape)).logits
        torch.testing.assert_close(got, eager_logits(t_windowed, shape), rtol=1e-4, atol=1e-4, msg=str(shape))


def test_onnx_export_at_one_window_per_level_runs_in_onnxruntime_at_other_sizes(t_windowed, exported, tmp_path):
    path = tmp_path / "mambavision.onnx"
    torch.onnx.export(exported, f=path, dynamo=True, input_names=["pixel_values"], output_names=["logits"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, channels, height, width = session.get_inputs()[0].shape  # symbolic sizes are names
    assert channels == 3 and all(isinstance(size, str) for size in (batch, height, width)), (batch, height, width)
    for shape in OTHERS:
        (logits,) = session.run(["logits"], {"pixel_values": pixels(shape).numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), eager_logits(t_windowed, shape), rtol=1e-4,
                                   atol=1e-4, msg=str(shape))


@pytest.mark.parametrize("shape", [(2, 5, 14, 14), (3, 5, 13, 30)])  # one window; 1x3 windows, both sides padded
def test_export_window_partition_and_reverse_are_the_eager_ones(shape):
    """Under export the windows are gathered by a computed index: the same tokens and maps, bit for bit."""
    (batch, _, height, width), window = shape, 14
    x = pixels(shape)
    tokens = modeling.window_partition(x, window)
    padded = torch.nn.functional.pad(x, (0, -width % window, 0, -height % window))
    assert torch.equal(modeling.export_window_partition(padded, window), tokens)
    assert torch.equal(modeling.window_reverse(tokens, window, batch, height, width), x)
    assert torch.equal(modeling.export_window_reverse(tokens, window, batch, height, width), x)


def test_exported_scan_is_not_unrolled_over_tokens():
    """The chunked scan's graph grows with log(length), not length: 1,024 tokens (a 512-input window) export to
    a few dozen operations, where a loop over tokens would give thousands."""

    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, C, D, delta_bias):
            return scan.selective_scan_chunked(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)

    def operations(length):
        inputs = (torch.randn(2, 4, length), torch.randn(2, 4, length), -torch.rand(4, 8) - 0.5,
                  torch.randn(2, 8, length), torch.randn(2, 8, length), torch.randn(4), torch.randn(4))
        graph = torch.export.export(Scan(), inputs).graph
        return sum(node.op == "call_function" for node in graph.nodes)

    short, long = operations(16), operations(1024)
    assert long < 150 and long - short < 60, (short, long)


def test_torch_compile_fullgraph(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor's C++ backend on CPU; raises on any graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels(COMPILED)).logits, eager_logits(model, COMPILED), rtol=1e-4, atol=1e-4)


def test_second_resolution_compiles_one_static_graph(model):
    """With ``dynamic=False`` (the README's advice) a new resolution is one more static graph: no symbolic
    sizes in it, and going back to the first resolution reuses the first graph."""
    torch._dynamo.reset()
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=capture, dynamic=False, fullgraph=True)
    first, second = (2, 3, 96, 64), (2, 3, 128, 160)
    with torch.no_grad():
        for shape in (first, second, first, second):
            torch.testing.assert_close(compiled(pixels(shape)).logits, eager_logits(model, shape), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2
    for graph in graphs:
        sizes = [size for node in graph.graph.nodes if node.op == "placeholder"
                 for size in getattr(node.meta.get("example_value"), "shape", ())]
        assert sizes and all(type(size) is int for size in sizes), sizes


def test_export_only_code_runs_under_export_and_never_under_compile(t_windowed, monkeypatch):
    """The window gather is for torch.export alone: torch.compile keeps the eager partition (and the single-window
    crop of a level's last block). On torch 2.11 TorchDynamo answers ``torch.compiler.is_exporting()`` with True under
    every trace, so asking it sent compiled models down the export path."""
    calls = []
    gather = modeling.export_window_partition
    monkeypatch.setattr(modeling, "export_window_partition", lambda *args: calls.append(1) or gather(*args))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(t_windowed, backend="eager", fullgraph=True)(pixels(COMPILED))
    assert calls == []
    torch.export.export(t_windowed, (pixels(EXPORTED),))
    assert calls
