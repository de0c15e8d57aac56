import torch

import nnopt
from nnopt.training import TrainConfig, train


def test_training_reduces_loss_and_reaches_accuracy(digits):
    model = nnopt.create_model("simplenet", seed=0)
    history = train(model, digits.train, TrainConfig(epochs=8), eval_data=digits.test, progress=False)
    assert history.epochs == 8 and len(history.eval_accuracy) == 8
    assert history.loss[-1] < history.loss[0] / 3
    assert history.eval_accuracy[-1] > 0.9
    assert history.seconds > 0
    assert not model.training


def test_same_seed_gives_the_same_weights(digits):
    weights = []
    for _ in range(2):
        model = nnopt.create_model("simplenet", seed=0)
        train(model, digits.train.subset(200), TrainConfig(epochs=2, seed=5), progress=False)
        weights.append(model.classifier.weight.detach().clone())
    assert torch.equal(*weights)


def test_callbacks_run_after_every_step(digits):
    class ZeroFirstRow:
        calls = 0

        def after_step(self, model):
            self.calls += 1
            with torch.no_grad():
                model.classifier.weight[0].zero_()

    callback = ZeroFirstRow()
    model = nnopt.create_model("simplenet", seed=0)
    data = digits.train.subset(100)
    train(model, data, TrainConfig(epochs=2, batch_size=32), callbacks=[callback], progress=False)
    assert callback.calls == 2 * 4  # ceil(100 / 32) steps per epoch
    assert torch.count_nonzero(model.classifier.weight[0]) == 0
