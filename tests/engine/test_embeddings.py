import pytest
import torch

from serve_app.engine.embeddings import from_arrays, to_arrays


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embeddings_cross_processes_as_numpy_bit_exactly(dtype):
    tensors = {"prompt": torch.randn(7, 16).to(dtype), "pooled": torch.randn(16).to(dtype)}
    arrays, dtypes = to_arrays(tensors)
    for a in arrays.values():
        a.setflags(write=False)  # as they arrive through Ray's object store
    back = from_arrays(arrays, dtypes)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t)
