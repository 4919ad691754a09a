"""InstructEdit's ``key_whitening`` option: the whitened keys of the pseudo-gradient.

The option right-multiplies each layer's pseudo-gradient key by ``(C / (tr C / d) + ridge I)^-1``,
``C`` the running second moment of the layer's inputs (edit rows and, while training, the
locality inputs), as ROME/MEMIT precondition their keys. Fast tests on a bare hypernetwork and
the tiny GPT-2 (no training run).
"""
from __future__ import annotations

import torch

from instructedit_plugin.instructedit import InstructEditModel, InstructEditTrainingHparams, encode_pairs
from instructedit_plugin.instructedit.hypernet import InstructEditHypernet, LayerSpec, RunningSecondMoment
from instructedit_plugin.models.loading import load_causal_lm
from tests.support.tiny_models import build_tiny_model_dir
from tests.test_instructedit_editing import TRAIN_YAML

SPEC = LayerSpec("layer.weight", 16, 8, "linear")


def _direction(generator: torch.Generator, norm: float) -> torch.Tensor:
    d = torch.randn(16, generator=generator)
    return norm * d / d.norm()


def _inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An edited layer's inputs: many rows of instruction/template tokens, and fewer answer-position
    rows that share one large common direction plus a small subject-specific part (cosine ~0.9 across
    subjects, as measured at the answer position). Returns ``(all rows, answer rows)``."""
    template = _direction(generator, 3.0) + 0.5 * torch.randn(600, 16, generator=generator)
    answers = _direction(generator, 4.0) + 0.4 * torch.randn(200, 16, generator=generator)
    rows = torch.cat([template, answers])
    return rows[torch.randperm(len(rows), generator=generator)], answers


def test_the_whitener_is_the_inverse_of_the_trace_normalised_second_moment_plus_ridge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    moments = RunningSecondMoment(6, ridge=0.05)
    assert moments.whitener() is None  # nothing seen yet: no whitening
    moments.update(x[:70])
    moments.update(x[70:])
    second = x.T @ x / 200
    second = second / (torch.trace(second) / 6)
    expected = torch.linalg.inv(second + 0.05 * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(moments.whitener().double(), expected, rtol=1e-5, atol=1e-6)
    first = moments.whitener()
    assert moments.whitener() is first  # cached while the statistic is unchanged
    moments.update(x[:3])
    assert moments.whitener() is not first


def test_whitened_update_moves_other_inputs_far_less_than_the_plain_one():
    """The defect of issue #13 item 4: an update keyed on one input moves inputs that share its
    common direction almost as much. Whitened, the other inputs move far less than the edited one."""
    g = torch.Generator().manual_seed(1)
    rows, answers = _inputs(g)
    ratios = {}
    for norm in (False, True):
        for whitening in (False, True):
            net = InstructEditHypernet([SPEC], rank=4, norm=norm, key_whitening=whitening, whitening_ridge=0.01)
            net.train()
            for chunk in rows.split(50):  # running statistics, as during meta-training
                net.pseudo_gradient(SPEC, chunk, torch.randn(chunk.shape[0], 8, generator=g))
            net.eval()
            edited, others = answers[:1], answers[1:]
            with torch.no_grad():
                grad = net.pseudo_gradient(SPEC, edited, torch.ones(1, 8))  # (out, in)
            ratios[norm, whitening] = float((others @ grad.T).norm(dim=-1).mean() / (edited @ grad.T).norm())
    for norm in (False, True):  # standardising with the pooled mean does not remove the answers' common part
        assert ratios[norm, False] > 0.7, ratios
        assert ratios[norm, True] < 0.5 * ratios[norm, False], ratios


def test_without_the_option_the_hypernetwork_and_its_state_are_unchanged():
    plain = InstructEditHypernet([SPEC], rank=4)
    assert "key_whitening" not in plain.config
    assert not [k for k in plain.state_dict() if "key_moments" in k]
    whitened = InstructEditHypernet([SPEC], rank=4, key_whitening=True, whitening_ridge=0.2)
    assert whitened.config["key_whitening"] is True and whitened.config["whitening_ridge"] == 0.2
    assert {"key_moments.layer__weight.moment", "key_moments.layer__weight.count"} <= set(whitened.state_dict())
    # the manifest's hypernet entry rebuilds the same network, buffers included
    rebuilt = InstructEditHypernet([SPEC], **whitened.config)
    rebuilt.load_state_dict(whitened.state_dict(), strict=True)


def test_locality_inputs_enter_the_statistic_only_while_training(tmp_path):
    model, tok = load_causal_lm(build_tiny_model_dir("gpt2"))
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.key_whitening = True
    editor = InstructEditModel(model, cfg)
    loc = encode_pairs(tok, [("The capital of France is", "Paris"), ("Hi", "there")], 32)
    n_real = int(loc["attention_mask"].sum())
    editor.hypernet.eval()
    editor(**loc)
    counts = [float(m.count) for m in editor.hypernet.key_moments.values()]
    assert counts == [0.0] * len(editor.specs)
    editor.hypernet.train()
    editor(**loc)  # the pre-edit locality forward of both trainers
    assert [float(m.count) for m in editor.hypernet.key_moments.values()] == [float(n_real)] * len(editor.specs)
    # an edit in training adds its rows with edit signal; its pseudo-gradients are whitened
    edited, _ = editor.edit(encode_pairs(tok, [("The capital of France is", "Rome")], 32))
    assert all(float(m.count) > n_real for m in editor.hypernet.key_moments.values())
    loss = editor.edit_loss_fn(cfg, edited(**loc), loc["labels"])["nll"]
    loss.backward()
    assert all(p.grad is not None for p in editor.hypernet.parameters() if p.requires_grad and p.dim() == 2)


def test_an_untrained_whitening_editor_returns_the_raw_input_key_times_the_whitener():
    """Untrained, the residual blocks are the identity: the key is the standardised input taken back
    to input coordinates (the raw ``u``), whitened; the value is the standardised ``delta``."""
    g = torch.Generator().manual_seed(2)
    rows, _ = _inputs(g)
    net = InstructEditHypernet([SPEC], rank=4, norm=True, key_whitening=True)
    net.train()
    net.pseudo_gradient(SPEC, rows, torch.randn(rows.shape[0], 8, generator=g))
    net.eval()
    u, d = rows[:3], torch.randn(3, 8, generator=g)
    with torch.no_grad():
        grad = net.pseudo_gradient(SPEC, u, d)
    factor_net = net.nets[SPEC.shape_key]
    expected = factor_net.d_norm(d).T @ (u @ net.key_moments["layer__weight"].whitener())
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-4)
