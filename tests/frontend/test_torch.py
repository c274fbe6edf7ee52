"""The PyTorch frontend: torch modules built through torch.onnx (dynamo) match torch's own outputs; Dim names become
symbolic dims; export failures are KILN-E107 with torch's reason; `kiln build` takes module:function entry points."""
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_close

import kiln
from kiln.cli import main
from kiln.errors import BuildError, KilnError, ParseError


class SmallCNN(torch.nn.Module):
    """conv-bn-relu, pooling, a residual add and a classifier: what a torchvision-free image model is made of."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.pool = torch.nn.MaxPool2d(2)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, image):
        x = self.pool(self.stem(image))
        x = torch.relu(x + self.block(x))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Block(torch.nn.Module):
    """A pre-norm transformer block: attention with a padding mask, then a GELU MLP."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attention = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, tokens, padding_mask):
        x = self.norm1(tokens)
        x = tokens + self.attention(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _randomize_batchnorm(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial running statistics, so that folding batch norm into the convolution is really checked."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.randn(layer.num_features, generator=generator) * 0.1)
    return module


def _expected(module, *inputs):
    with torch.no_grad():
        return module.eval()(*inputs)


def test_small_cnn_matches_torch():
    torch.manual_seed(0)
    model = _randomize_batchnorm(SmallCNN(), seed=1)
    image = torch.randn(2, 3, 16, 16)
    engine = kiln.build(model, kiln.BuilderConfig(), example_inputs=(image,))
    assert [b.name for b in engine.inputs] == ["image"] and [b.name for b in engine.outputs] == ["output"]
    fresh = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # not the traced example
    assert_close(engine.run({"image": fresh.numpy()})["output"], _expected(model, fresh).numpy(), rtol=1e-3, atol=1e-5)


def test_transformer_block_matches_torch_with_a_padding_mask():
    torch.manual_seed(0)
    model = Block()
    tokens = torch.randn(2, 6, 32)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    engine = kiln.from_torch(model, (tokens, mask))
    assert [b.name for b in engine.inputs] == ["tokens", "padding_mask"]
    result = engine.run({"tokens": tokens, "padding_mask": mask})["output"]  # torch in, torch out
    assert isinstance(result, torch.Tensor)
    assert_close(result.numpy(), _expected(model, tokens, mask).numpy(), rtol=1e-3, atol=1e-5)


def test_dynamic_batch_runs_at_several_batch_sizes_with_the_dims_name(monkeypatch):
    import kiln.frontend.torch as frontend

    warnings = []
    monkeypatch.setattr(frontend.log, "warning", lambda message, *args: warnings.append(message % args))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Softmax(-1))
    batch = torch.export.Dim("batch", min=1, max=64)
    width = torch.export.Dim("width")  # the first Linear needs 12 features: torch.export fixes it, kiln says so
    engine = kiln.build(model, example_inputs=(torch.randn(4, 12),), dynamic_shapes=({0: batch, 1: width},),
                        input_names=["features"], output_names=["probabilities"])
    assert len(warnings) == 1 and "'width' was declared dynamic" in warnings[0]
    assert engine.inputs[0].name == "features" and engine.inputs[0].shape == ("batch", 12)
    assert engine.outputs[0].name == "probabilities" and engine.outputs[0].shape[0] == "batch"
    rng = np.random.default_rng(3)
    for size in (1, 3, 17):
        features = rng.standard_normal((size, 12)).astype(np.float32)
        out = engine.run({"features": features})["probabilities"]
        assert out.shape == (size, 3)
        assert_close(out, _expected(model, torch.from_numpy(features)).numpy(), rtol=1e-4, atol=1e-6, what=f"batch {size}")
    # The Dim's range is the engine's profile, tuned for the example's batch of 4: no add_profile was needed.
    assert [p.shapes for p in engine.profiles] == [{"features": ((1, 12), (4, 12), (64, 12))}]
    with pytest.raises(kiln.BindingError) as caught:
        engine.run({"features": np.zeros((65, 12), np.float32)})
    assert caught.value.code == "KILN-E406"


def test_a_dim_without_max_asks_for_a_bound_unless_the_config_has_a_profile():
    model = torch.nn.Linear(6, 2)
    unbounded = ({0: torch.export.Dim("rows")},)
    with pytest.raises(BuildError) as caught:
        kiln.build(model, example_inputs=(torch.randn(3, 6),), dynamic_shapes=unbounded)
    assert caught.value.code == "KILN-E202" and "'rows'" in caught.value.message and "max=" in caught.value.hint
    config = kiln.BuilderConfig()
    config.add_profile({"input": ((1, 6), (2, 6), (8, 6))})  # the user's own profile takes precedence
    engine = kiln.build(model, config, example_inputs=(torch.randn(3, 6),), dynamic_shapes=unbounded)
    assert engine.inputs[0].shape == ("rows", 6) and engine.profiles[0].shapes["input"][2] == (8, 6)


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Linear(4, 4)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x, scale):
        hidden = self.dropout(self.features(x))
        return {"scores": hidden * scale, "total": hidden.sum(-1)}


def test_dict_outputs_are_named_by_their_keys_and_the_module_keeps_its_training_mode():
    model = TwoHeads().train()
    model.features.eval()  # a frozen part inside a model in training
    x, scale = torch.randn(3, 4), torch.tensor(2.0)
    engine = kiln.build(model, example_inputs={"x": x, "scale": scale})
    assert model.training and model.dropout.training and not model.features.training  # handed back as it came
    assert [b.name for b in engine.inputs] == ["x", "scale"]
    assert [b.name for b in engine.outputs] == ["scores", "total"]
    out = engine.run({"x": x.numpy(), "scale": scale.numpy()})
    expected = _expected(model, x, scale)
    assert_close(out["scores"], expected["scores"].numpy(), rtol=1e-5, atol=1e-6)
    assert_close(out["total"], expected["total"].numpy(), rtol=1e-5, atol=1e-6)


class BranchesOnValues(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_branch_is_a_kiln_error_with_torchs_reason_and_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParseError) as caught:
        kiln.build(BranchesOnValues(), example_inputs=(torch.randn(3),))
    assert not list(tmp_path.iterdir())  # the export leaves no report or model files in the working directory
    error = caught.value
    assert error.code == "KILN-E107"
    assert "data-dependent" in error.message and "BranchesOnValues" in error.message
    assert "if x.sum() > 0" in error.where and "test_torch.py" in error.where
    assert "torch.cond" in error.hint and "submodule" in error.hint
    assert error.__cause__ is None and error.__suppress_context__  # torch's traceback stays out of the report
    assert "\x1b[" not in str(error)


def test_wrong_build_options_are_clear_errors():
    with pytest.raises(BuildError, match="example inputs") as caught:
        kiln.build(TwoHeads())
    assert caught.value.code == "KILN-E203"
    with pytest.raises(BuildError, match="1 output name") as caught:
        kiln.build(TwoHeads(), example_inputs=(torch.randn(1, 4), torch.tensor(1.0)), output_names=["only_one"])
    assert "scores, total" in caught.value.message
    with pytest.raises(BuildError, match="dynamic_shapes") as caught:
        kiln.build("model.onnx", dynamic_shapes={})
    assert caught.value.code == "KILN-E203"
    with pytest.raises(ParseError, match="cannot build from a builtins.dict") as caught:
        kiln.build({"weights": 1})
    assert caught.value.code == "KILN-E106"


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickled_torch_files_are_refused_and_the_entry_point_form_is_shown(tmp_path, suffix, capsys):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")
    assert main(["build", str(path)]) == 1
    err = capsys.readouterr().err
    assert "KILN-E106" in err and "never loaded" in err and "my_package.models:make_model" in err
    assert "returns (module, example_inputs)" in err


def test_uff_is_refused_as_obsolete_pointing_to_the_tensorflow_path(tmp_path, capsys):
    path = tmp_path / "model.uff"
    path.write_bytes(b"uff")
    assert main(["build", str(path)]) == 1
    err = capsys.readouterr().err
    assert "KILN-E106" in err and "obsolete" in err and "kiln[tensorflow]" in err and "saved_model_dir" in err


ENTRY_POINT_MODULE = textwrap.dedent('''
    import torch

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, features):
            return torch.sigmoid(self.fc(features))

    def make_model():
        torch.manual_seed(0)
        batch = torch.export.Dim("batch", min=1, max=32)
        return Scorer(), (torch.randn(2, 8),), {"features": {0: batch}}

    def broken():
        raise RuntimeError("weights not found")
''')


def test_cli_builds_from_a_module_function_entry_point(tmp_path, monkeypatch, capsys):
    (tmp_path / "kiln_test_models.py").write_text(ENTRY_POINT_MODULE)
    monkeypatch.chdir(tmp_path)  # importable from the current directory, as a user runs it
    assert main(["build", "kiln_test_models:make_model"]) == 0
    out = capsys.readouterr().out
    assert "features: float32[batchx8]" in out and (tmp_path / "make_model.kiln").exists()
    engine = kiln.load(str(tmp_path / "make_model.kiln"))
    from kiln_test_models import make_model

    module = make_model()[0]
    for size in (1, 5):
        features = np.random.default_rng(size).standard_normal((size, 8)).astype(np.float32)
        assert_close(engine.run({"features": features})["output"], _expected(module, torch.from_numpy(features)).numpy(),
                     rtol=1e-5, atol=1e-6)
    assert main(["build", "kiln_test_models:broken"]) == 1
    err = capsys.readouterr().err
    assert "KILN-E104" in err and "RuntimeError: weights not found" in err
    assert main(["build", "kiln_no_such_module:make_model"]) == 1
    assert "PYTHONPATH" in capsys.readouterr().err


def test_every_failure_here_is_a_kiln_error():
    with pytest.raises(KilnError):
        kiln.build(torch.nn.Linear(2, 2), example_inputs=(torch.randn(3, 5),))  # wrong feature size for the layer


FAILING_MODELS = textwrap.dedent('''
    import torch

    class WrongFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * 2

    class ReadsPointer(torch.nn.Module):
        def forward(self, x):
            return x * (x.data_ptr() % 7)

    def wrong_features():
        return WrongFeatures(), (torch.randn(3, 5),)

    def reads_pointer():
        return ReadsPointer(), (torch.randn(3),)
''')


def test_a_failed_export_prints_kilns_report_alone_with_the_models_line(tmp_path):
    """torch's fake-tensor code logs the failure it is about to raise, traceback and all, to the stderr its logging
    was set up with; a user of `kiln build` sees only kiln's report. An example input the model itself rejects (in
    plain PyTorch too) is said to be that, not an export limitation to rewrite with torch.cond."""
    import os
    import subprocess
    import sys

    (tmp_path / "kiln_failing_models.py").write_text(FAILING_MODELS)
    env = {**os.environ, "KILN_PROGRESS": "0"}
    env.pop("KILN_LOG", None)
    for entry, line, words in (("wrong_features", 'line 10, in forward: return self.fc(x) * 2',
                                ("forward raises RuntimeError", "3x5 and 2x2", "on the example inputs")),
                               ("reads_pointer", "line 14, in forward: return x * (x.data_ptr() % 7)",
                                ("Cannot access data pointer",))):
        done = subprocess.run([sys.executable, "-m", "kiln", "build", f"kiln_failing_models:{entry}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[0].startswith("kiln build: [KILN-E107]"), done.stderr  # nothing of torch's before the report
        assert len(lines) == 3 and "Traceback" not in done.stderr and "fake_tensor" not in done.stderr, done.stderr
        assert "kiln_failing_models.py" in lines[1] and line in lines[1], done.stderr
        for word in words:
            assert word in lines[0], done.stderr
        if entry == "wrong_features":
            assert "example inputs of the shapes and dtypes" in lines[2] and "torch.cond" not in lines[2]
