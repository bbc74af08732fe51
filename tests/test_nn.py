"""The drop-in sequence module fastxlstm.nn.XLSTM: shapes, state passing, bidirectional."""

import pytest
import torch

from fastxlstm.nn import XLSTM
from fastxlstm.stack import XLSTMStack
from tests.helpers import assert_close

OPTS = dict(backend="native", chunk_size=4, mlstm_num_heads=2, slstm_num_heads=2)


def test_shapes_and_state():
    rnn = XLSTM(6, 16, 3, slstm_at=(1,), **OPTS)
    y, state = rnn(torch.randn(4, 11, 6))
    assert y.shape == (4, 11, 16)
    assert len(state) == 1 and len(state[0]) == 3
    conv, cell = state[0][1]                               # the sLSTM block
    assert conv.shape == (4, 3, 16) and cell.c.shape == (4, 2, 8)
    assert isinstance(rnn.directions[0], XLSTMStack)


def test_time_major_input():
    rnn = XLSTM(6, 16, 2, batch_first=False, **OPTS).double()
    x = torch.randn(11, 4, 6, dtype=torch.float64)
    y, _ = rnn(x)
    rnn.batch_first = True
    y_bf, _ = rnn(x.transpose(0, 1))
    assert y.shape == (11, 4, 16)
    assert_close("time-major", y_bf.transpose(0, 1), y, torch.float64)


def test_state_passing_equals_one_call():
    rnn = XLSTM(5, 16, 3, slstm_at=(0, 2), **OPTS).double()
    x = torch.randn(2, 19, 5, dtype=torch.float64)
    y, s = rnn(x)
    y1, s1 = rnn(x[:, :7])
    y2, s2 = rnn(x[:, 7:], s1)
    assert_close("split", y, torch.cat([y1, y2], 1), torch.float64)
    for a, b in zip(s[0], s2[0]):
        assert_close("conv state", a.conv, b.conv, torch.float64)


def test_bidirectional_equals_blocks_by_hand():
    rnn = XLSTM(5, 16, 2, slstm_at=(1,), bidirectional=True, **OPTS).double()
    x = torch.randn(3, 13, 5, dtype=torch.float64)
    y, state = rnn(x)
    assert y.shape == (3, 13, 32) and len(state) == 2
    h = rnn.proj_in(x)
    fwd, _ = rnn.directions[0](h)
    bwd, _ = rnn.directions[1](h.flip(1))
    assert_close("forward half", fwd, y[..., :16], torch.float64)
    assert_close("backward half", bwd.flip(1), y[..., 16:], torch.float64)
    # the backward direction at step 0 has seen the whole sequence
    y_short, _ = rnn(x[:, :5])
    assert not torch.allclose(y_short[:, 0, 16:], y[:, 0, 16:])


def test_trains():
    rnn = XLSTM(3, 16, 2, slstm_at=(1,), **OPTS)
    y, _ = rnn(torch.randn(2, 7, 3))
    y.pow(2).mean().backward()
    assert all(p.grad is not None for p in rnn.parameters())


@pytest.mark.parametrize("kwargs, x, match", [
    (dict(), torch.randn(2, 7, 4), "features"),
    (dict(), torch.randn(7, 3), "3-d"),
    (dict(embedding_dim=8), None, "hidden_size"),
    (dict(slstm_at=(5,)), None, "slstm_at"),
    (dict(input_size=0), None, "input_size"),
])
def test_bad_input_raises(kwargs, x, match):
    args = dict(input_size=3, hidden_size=16, num_blocks=2, **OPTS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rnn = XLSTM(args.pop("input_size"), args.pop("hidden_size"), args.pop("num_blocks"), **args)
        rnn(x)
