"""Units of any layout: decided by the module, overridden by the user, one-line errors otherwise."""
import pytest
import torch
import torch.nn as nn

import selectivity as sel
from selectivity.units import Units, layout_of, unit_means


class Tokens(nn.Module):
    """[B, T, D] tokens through Linear -> GELU -> Linear; ``mixer`` is a module of unknown type."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)
        self.mixer = Mixer()

    def forward(self, x):
        return self.mixer(self.fc2(self.act(self.fc1(x))))


class Mixer(nn.Module):
    def forward(self, x):
        return x.flip(1)


def test_layouts_are_decided_by_the_module():
    seq = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Dropout(), nn.SiLU())
    assert [layout_of(seq, n) for n in "01234"] == ["units_first", "units_first", "units_last",
                                                  "units_last", "units_last"]
    m = Tokens()
    assert [layout_of(m, n) for n in ("fc1", "act", "fc2", "mixer")] == \
        ["units_last", "units_last", "units_last", None]


def test_token_and_1d_outputs_give_the_means_over_tokens_and_length():
    m = Tokens()
    x = torch.randn(4, 7, 6)
    # fc1 and GELU go negative: the tracker measures their positive part (test_negative.py)
    tracker = sel.SelectivityTracker(m, 2, units=["fc1", "act"], negative="relu")
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad(), tracker.track(labels):
        m(x)
    tracker.enabled = False  # the reference below calls fc1 again
    act = nn.functional.gelu(m.fc1(x)).clamp_min(0).detach().double().mean(1)  # mean over tokens
    sums = torch.stack([act[labels == k].sum(0) for k in range(2)])
    torch.testing.assert_close(tracker.compute()["act"].sums, sums)
    conv = nn.Sequential(nn.Conv1d(2, 4, 3))
    y = torch.randn(3, 2, 9)
    got = {}
    with sel.UnitHooks(conv, "0", lambda n, u: got.update({n: unit_means(u)})):
        conv(y)
    torch.testing.assert_close(got["0"], conv(y).mean(2))


def test_channels_last_4d_output_of_a_linear_and_an_override():
    m = nn.Sequential(nn.Linear(3, 5))
    x = torch.randn(2, 4, 4, 3)  # [B, H, W, C]
    got = {}
    with sel.UnitHooks(m, "0", lambda n, u: got.update({n: unit_means(u)})):
        m(x)
    torch.testing.assert_close(got["0"], m(x).mean((1, 2)))
    tok = Tokens()
    with sel.UnitHooks(tok, Units("mixer", layout={"mix*": "units_last"}),
                       lambda n, u: got.update({n: unit_means(u)})) as h:
        tok(torch.randn(2, 7, 6))
    assert h.layouts == {"mixer": "units_last"} and got["mixer"].shape == (2, 3)


def test_undecidable_unsupported_and_mismatched_outputs_are_one_line_errors():
    tok = Tokens()
    with sel.UnitHooks(tok, "mixer", lambda n, u: None), \
            pytest.raises(sel.UnitsError) as e:
        tok(torch.randn(2, 7, 6))
    msg = str(e.value)
    assert "\n" not in msg and "layer mixer (Mixer): output shape [2, 7, 3]" in msg
    assert "layout='units_first'" in msg and "layout='units_last'" in msg
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 1))
    with sel.UnitHooks(conv3d, "0", lambda n, u: None), pytest.raises(sel.UnitsError,
                                                                      match="is not supported"):
        conv3d(torch.randn(1, 1, 2, 2, 2))
    lin2 = nn.Sequential(nn.Linear(3, 4))  # the module's own width is checked
    lin2[0].out_features = 5  # a module whose output does not hold the units it declares
    with sel.UnitHooks(lin2, "0", lambda n, u: None), \
            pytest.raises(sel.UnitsError, match="does not hold the module's 5 units"):
        lin2(torch.randn(2, 3))
    with pytest.raises(sel.UnitsError, match="tokens must be one of mean, cls"):
        Units("blocks", tokens="first")
    with pytest.raises(sel.UnitsError, match="layout must be one of units_first, units_last"):
        Units("blocks", layout="nhwc")


def test_a_replacement_output_goes_back_to_the_layout():
    m = Tokens()
    x = torch.randn(2, 7, 6)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    with sel.UnitHooks(m, "act", lambda n, u: u * mask[None, :, None, None]):
        out = m(x)
    torch.testing.assert_close(out, m.fc2(nn.functional.gelu(m.fc1(x)) * mask).flip(1))


def test_original_contract_for_undecided_2d_and_4d_outputs():
    class Block(nn.Module):  # unknown type: [B, U, H, W] as always
        def forward(self, x):
            return x * 2
    m = nn.Sequential(Block())
    got = {}
    with sel.UnitHooks(m, "0", lambda n, u: got.update({n: u})) as h:
        out = m(torch.randn(2, 3, 4, 5))
    assert h.layouts == {"0": None} and got["0"] is out
