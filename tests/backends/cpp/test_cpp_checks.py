"""The C++ ops called directly (torch.ops, past the Python argument checks) check their
arguments too: a clear RuntimeError, no crash on bad shapes."""
import pytest
import torch

from bad_inputs import expect_rejected
from regnet_kernels.backends.cpp import ops as cpp

R = torch.randn

# (op, its arguments from (x, w, y, stats) of a valid conv_bn_train, message)
CASES = [
    ("conv_bn_act", lambda x, w, y, st: (R(2, 16, 7, 7), R(16, 8, 3, 3), torch.ones(3),
                                         torch.zeros(16), 1, 2, True), "scale must have shape"),
    ("conv_bn_act", lambda x, w, y, st: (R(2, 16, 7, 7), R(16, 8, 3, 3), torch.ones(16),
                                         torch.zeros(16), 1, 3, True), "groups"),
    ("conv1x1_gate_residual", lambda x, w, y, st: (R(1, 8, 4, 4), R(8, 8, 1, 1), torch.ones(8),
                                                   torch.zeros(8), None, R(1, 8, 5, 4), None,
                                                   None, None, 1), "identity shortcut"),
    ("se_excite", lambda x, w, y, st: (R(2, 1, 8), 4, R(2, 8), R(3), R(8, 2), R(8)),
     "SE weights"),
    ("conv_bn_train", lambda x, w, y, st: (x, w, 1, 2, None, None, False, torch.rand(2, 15),
                                           None, None, 1e-5, None), "gate must be float32"),
    ("conv_bn_train", lambda x, w, y, st: (x[:1, :, :1, :1], w, 1, 2, None, None, False, None,
                                           None, None, 1e-5, None), "more than 1 value"),
    ("conv_bn_train_backward", lambda x, w, y, st: (y[:, :, :6], x, w, y, st, 1, 2, None, None,
                                                    False, None, False, [True, True]),
     "grad must have y's shape"),
    ("conv_bn_train_backward", lambda x, w, y, st: (y, x, w, y, st, 2, 2, None, None, False,
                                                    None, False, [True, True]),
     "y must be the conv output"),
    ("conv_bn_train_backward", lambda x, w, y, st: (y, x, w, y, st[:4], 1, 2, None, None, False,
                                                    None, False, [True, True]),
     "stats must be float32"),
    ("bn_update_running", lambda x, w, y, st: (st, 98, torch.zeros(16), torch.ones(16), None,
                                               None), "needs num_batches_tracked"),
    ("bn_update_running", lambda x, w, y, st: (st, 98, torch.zeros(15), torch.ones(16), None,
                                               0.1), "running_mean and running_var must have shape"),
    ("se_squeeze_backward", lambda x, w, y, st: (R(2, 2, 16), y, st[2], st[3]),
     "grad_sums must be float32"),
    ("bn_add_relu", lambda x, w, y, st: (y, st[2], st[3], y[:1], None, None),
     "shortcut must have y's shape"),
    ("bn_add_relu_backward", lambda x, w, y, st: (y.half(), y), "grad must have out's shape"),
]


@pytest.mark.parametrize("op,args,match", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_ops_check_behind_the_python_ones(op, args, match):
    ops = cpp._ops()
    x, w = torch.randn(2, 16, 7, 7), torch.randn(16, 8, 3, 3)
    y, stats = ops.conv_bn_train(x, w, 1, 2, None, None, False, None, None, None, 1e-5, None)
    expect_rejected(op, "cpu", lambda: getattr(ops, op)(*args(x, w, y, stats)), RuntimeError,
                    match)
