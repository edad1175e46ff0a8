"""The EMA of the weights and the weighted loss total."""
import torch
from torch import nn

from detr_cuda.engine.ema import ModelEMA
from detr_cuda.engine.trainer import weighted_total


def test_ema_tracks_weights_and_the_weighted_total():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # effective decay min(0.5, 2/11)
    expected = model.weight - 1.0 + (1 - 2 / 11) * 1.0
    torch.testing.assert_close(ema.module.weight, expected)
    assert weighted_total({"a": torch.tensor(2.0), "b": torch.tensor(3.0), "c": torch.tensor(9.0)},
                          {"a": 1.0, "b": 2.0}).item() == 8.0
