"""The batched trainer against plain torch references: nn.Linear + torch.optim.SGD, runs done alone."""
import copy

import pytest
import torch
import torch.nn.functional as F

from utils.losses import distillation_targets, pll_candidates
import utils.train
from utils.runs import Hyper
from utils.threads import ThreadTuner, batched_products_match_lone, products_thread_invariant
from utils.train import NonFiniteLoss, Snapshot, Targets, TrainData, evaluate, shuffled_positions, topk_hits

N, D, K, N_TRAIN, N_TEST = 120, 6, 4, 90, 50


def _features(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g) * 2
    y = torch.arange(N) % K
    x = (centres[y] + torch.randn(N, D, generator=g)) * scale
    ty = torch.arange(N_TEST) % K
    tx = (centres[ty] + torch.randn(N_TEST, D, generator=g)) * scale
    return x, y, tx, ty


def make_data(num_runs, seed=0, scale=1.0, val=False):
    """Each run trains on its own subset of rows with its own noisy labels."""
    x, y, tx, ty = _features(seed, scale)
    g = torch.Generator().manual_seed(seed + 100)
    rows = torch.stack([torch.randperm(N, generator=g)[:N_TRAIN] for _ in range(num_runs)])
    true = y[rows]
    flip = torch.rand(rows.shape, generator=g) < 0.3
    noisy = torch.where(flip, torch.randint(0, K, rows.shape, generator=g), true)
    val_rows = val_labels = None
    if val:
        val_rows = torch.stack([torch.tensor([r for r in range(N) if r not in set(rr.tolist())])
                                for rr in rows])
        val_labels = y[val_rows]
    return TrainData(x, rows, noisy, true, tx, ty, val_rows, val_labels, K)


def select(data: TrainData, r: int) -> TrainData:
    pick = lambda t: None if t is None else t[r:r + 1].clone()  # noqa: E731
    return TrainData(data.features, pick(data.train_rows), pick(data.noisy_labels), pick(data.true_labels),
                     data.test_features, data.test_labels, pick(data.val_rows), pick(data.val_labels),
                     data.num_classes)


def select_targets(t: Targets, r: int) -> Targets:
    pick = lambda v: None if v is None else v[r:r + 1].clone()  # noqa: E731
    return Targets(t.kind, pick(t.values), pick(t.smoothing), pick(t.temperature))


def hyper(lr, wd, mom, gamma):
    """Per-run lr, weight decay, momentum and gamma (lists), as train() takes them."""
    return lr, wd, mom, gamma


def train(data, targets, init, hp, epochs, batch, seeds, resume=None, on_epoch=None, **options):
    """utils.train.train_heads with one Hyper per run from hyper()'s lists, epochs and batch size."""
    hypers = [Hyper(lr=lr, wd=wd, momentum=m, gamma=g, epochs=epochs, train_batch=batch)
              for lr, wd, m, g in zip(*hp)]
    return utils.train.train_heads(data, targets, init, hypers, seeds, resume, on_epoch, **options)


def init_weights(num_runs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_runs, K, D, generator=g) * 2 - 1) / D ** 0.5


def make_targets(kind, data, num_runs):
    if kind == "hard":
        return Targets("hard", data.noisy_labels, smoothing=torch.tensor([0.0, 0.2, 0.05][:num_runs]))
    teacher = torch.randn(num_runs, K, D, generator=torch.Generator().manual_seed(9))
    logits = torch.bmm(data.features[data.train_rows], teacher.transpose(1, 2))
    if kind == "soft":
        temp = torch.tensor([1.0, 2.0, 0.5][:num_runs])
        return Targets("soft", distillation_targets(logits, temp), temperature=temp)
    return Targets("partial", pll_candidates(logits))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["hard", "soft", "partial"])
@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_batched_runs_equal_runs_done_alone_bit_for_bit(kind, threads, shape, monkeypatch):
    """Every number of a run is the same bits whatever runs share its batch ('wide': products big
    enough for the BLAS's own kernels, with a last batch of another size)."""
    global D, K
    if shape == "wide":
        monkeypatch.setattr(__import__(__name__), "D", 96)
        monkeypatch.setattr(__import__(__name__), "K", 24)
    torch.set_num_threads(threads)
    try:
        if threads > 1 and not batched_products_match_lone([16, 10], D, K):
            pytest.skip(f"this BLAS rounds batch items differently at {threads} threads: the engine trains "
                        "on 1 thread then "
                        "(test_thread_choice_falls_back_to_one_when_the_blas_is_not_batch_exact)")
        data = make_data(3, val=True)
        targets = make_targets(kind, data, 3)
        hp = ([0.1, 0.03, 0.2], [1e-3, 0.0, 5e-2], [0.9, 0.5, 0.0], [0.98, 0.9, 1.0])
        seeds = [11, 22, 33]
        init = init_weights(3)
        together = train(data, targets, init, hyper(*hp), 4, 16, seeds)
        for r in range(3):
            alone = train(select(data, r), select_targets(targets, r), init[r:r + 1],
                                hyper(*[[v[r]] for v in hp]), 4, 16, [seeds[r]])
            assert torch.equal(together.weight[r], alone.weight[0])
            assert torch.equal(together.momentum[r], alone.momentum[0])
            assert together.history[r] == alone.history[0]
            for rule in ("test", "val"):
                a, b = together.best[rule], alone.best[rule]
                assert int(a.epoch[r]) == int(b.epoch[0]) and torch.equal(a.weight[r], b.weight[0])
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("kind", ["hard", "soft", "partial"])
def test_runs_sharing_their_batches_equal_runs_done_alone_bit_for_bit(kind, monkeypatch):
    """Two blocks of three runs with one seed and the same rows each (a grid's rates of one seed):
    their mini-batches are gathered once per block, and each run still gets its lone bits."""
    monkeypatch.setattr(__import__(__name__), "D", 96)
    monkeypatch.setattr(__import__(__name__), "K", 24)
    data = make_data(6)
    same = data.train_rows[:1].expand(6, -1).clone()
    data = TrainData(data.features, same, data.noisy_labels, data.true_labels, data.test_features,
                     data.test_labels, num_classes=K)
    logits = torch.bmm(data.features[data.train_rows],
                       torch.randn(6, K, D, generator=torch.Generator().manual_seed(9)).transpose(1, 2))
    smoothing = torch.tensor([0.0, 0.2, 0.05, 0.0, 0.1, 0.0])
    temperature = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 3.0])
    targets = {"hard": Targets("hard", data.noisy_labels, smoothing=smoothing),
               "soft": Targets("soft", distillation_targets(logits, temperature), temperature=temperature),
               "partial": Targets("partial", pll_candidates(logits))}[kind]
    hp = ([0.1, 0.03, 0.2, 0.05, 0.1, 0.01], [1e-3, 0.0, 5e-2, 1e-4, 0.0, 1e-3], [0.9] * 6, [0.98] * 6)
    seeds = [5, 5, 5, 7, 7, 7]
    init = init_weights(6)
    together = train(data, targets, init, hyper(*hp), 3, 16, seeds)
    fused = train(data, targets, init, hyper(*hp), 3, 16, seeds, fuse_shared_order=True)
    torch.testing.assert_close(fused.weight, together.weight, atol=1e-5, rtol=1e-4)  # same maths
    for r in range(6):
        alone = train(select(data, r), select_targets(targets, r), init[r:r + 1],
                            hyper(*[[v[r]] for v in hp]), 3, 16, [seeds[r]])
        assert torch.equal(together.weight[r], alone.weight[0]) and together.history[r] == alone.history[0]


@pytest.mark.parametrize("kind", ["hard", "soft", "partial"])
@pytest.mark.parametrize("order", ["independent", "shared"])
def test_the_fast_epoch_gives_the_bits_of_the_plain_definition(kind, order, monkeypatch):
    """_BatchedSGD (shared gathers, buffers, cache-sized updates) against PlainSGD, the definition
    written plainly: the same weights, momenta, snapshots and per-epoch numbers, bit for bit."""
    monkeypatch.setattr(__import__(__name__), "D", 96)
    monkeypatch.setattr(__import__(__name__), "K", 24)
    monkeypatch.setattr(utils.train, "UPDATE_CHUNK_BYTES", 2 * K * D * 4)  # two runs per update
    data = make_data(4, val=True)
    seeds = [1, 2, 3, 4] if order == "independent" else [5, 5, 7, 7]
    if order == "shared":
        data.train_rows = data.train_rows[:1].expand(4, -1).clone()
    logits = torch.bmm(data.features[data.train_rows],
                       torch.randn(4, K, D, generator=torch.Generator().manual_seed(9)).transpose(1, 2))
    spread = torch.tensor([1.0, 2.0, 0.5, 3.0])
    targets = {"hard": Targets("hard", data.noisy_labels, smoothing=spread / 10),
               "soft": Targets("soft", distillation_targets(logits, spread), temperature=spread),
               "partial": Targets("partial", pll_candidates(logits))}[kind]
    hp = hyper([0.1, 0.03, 0.2, 0.05], [1e-3, 0.0, 5e-2, 1e-4], [0.9, 0.5, 0.0, 0.9], [0.98, 0.9, 1.0, 0.95])
    fast = train(data, targets, init_weights(4), hp, 3, 16, seeds)
    plain = train(data, targets, init_weights(4), hp, 3, 16, seeds, plain=True)
    assert torch.equal(fast.weight, plain.weight) and torch.equal(fast.momentum, plain.momentum)
    assert fast.history == plain.history
    for rule in ("test", "val"):
        assert torch.equal(fast.best[rule].weight, plain.best[rule].weight)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("order, seeds, runs_per_update, updates", [
    ("independent, a last shorter chunk", [1, 2, 3, 4, 5, 6], 4, [(0, 4), (4, 6)]),
    ("independent, one run at a time", [1, 2, 3, 4, 5, 6], 1, [(r, r + 1) for r in range(6)]),
    ("shared, blocks of 3 split 2 + 1", [5, 5, 5, 7, 7, 7], 2, [(0, 2), (2, 3), (3, 5), (5, 6)]),
    ("fused, 2 blocks of 2 then 1", [5, 5, 7, 7, 9, 9], 4, [(0, 4), (4, 6)]),
])
def test_updating_a_few_runs_at_a_time_changes_no_number(kind, order, seeds, runs_per_update, updates,
                                                         monkeypatch):
    """On one thread a step updates the heads of a few runs at a time (UPDATE_CHUNK_BYTES, for the
    cache): every number is the one of all runs updated at once."""
    monkeypatch.setattr(__import__(__name__), "D", 96)
    monkeypatch.setattr(__import__(__name__), "K", 24)
    torch.set_num_threads(1)
    data = make_data(6, val=True)
    if not order.startswith("independent"):
        data.train_rows = data.train_rows[:1].expand(6, -1).clone()
    logits = torch.bmm(data.features[data.train_rows],
                       torch.randn(6, K, D, generator=torch.Generator().manual_seed(9)).transpose(1, 2))
    spread = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5, 3.0])
    targets = (Targets("hard", data.noisy_labels, smoothing=spread / 10) if kind == "hard" else
               Targets("soft", distillation_targets(logits, spread), temperature=spread))
    hp = hyper([0.1, 0.03, 0.2, 0.05, 0.1, 0.01], [1e-3, 0.0, 5e-2, 1e-4, 0.0, 1e-3],
               [0.9, 0.5, 0.0, 0.9, 0.8, 0.9], [0.98] * 6)
    fuse = order.startswith("fused")

    def train_all():
        return train(data, targets, init_weights(6), hp, 3, 16, seeds, fuse_shared_order=fuse)

    monkeypatch.setattr(utils.train, "UPDATE_CHUNK_BYTES", 1 << 40)
    whole = train_all()
    monkeypatch.setattr(utils.train, "UPDATE_CHUNK_BYTES", runs_per_update * K * D * 4)
    heads = init_weights(6)
    hypers = [Hyper(lr=lr, wd=wd, momentum=m, gamma=g, train_batch=16) for lr, wd, m, g in zip(*hp)]
    sgd = utils.train._BatchedSGD(data, targets, hypers, seeds, heads, torch.zeros_like(heads), fuse)
    assert [(unit.runs.start, unit.runs.stop) for unit in sgd.units[True]] == updates
    chunked = train_all()
    assert torch.equal(whole.weight, chunked.weight) and torch.equal(whole.momentum, chunked.momentum)
    assert whole.history == chunked.history


def test_thread_choice_falls_back_to_one_when_the_blas_is_not_batch_exact(monkeypatch):
    import utils.threads as engine
    said = []
    monkeypatch.setattr(engine, "_DEFAULT_THREADS", 2)
    monkeypatch.setattr(engine, "_FREE_THREADS", {})
    cpu = torch.device("cpu")
    try:
        assert engine.cpu_thread_plan(cpu, 208, 128, 64, 10, said.append) == (1, None)  # small: one thread
        monkeypatch.setattr(engine, "batched_products_match_lone", lambda *a: True)
        monkeypatch.setattr(engine, "products_thread_invariant", lambda *a: True)
        threads, tuner = engine.cpu_thread_plan(cpu, 208, 128, 512, 100, said.append)
        assert threads == 2 and tuner.counts == (2, 1) and torch.get_num_threads() == 2 and said == []
        for probe in ("batched_products_match_lone", "products_thread_invariant"):
            monkeypatch.setattr(engine, "_FREE_THREADS", {})
            monkeypatch.setattr(engine, probe, lambda *a: False)
            assert engine.cpu_thread_plan(cpu, 208, 128, 512, 100, said.append) == (1, None)
            assert engine.cpu_thread_plan(cpu, 208, 128, 512, 100, said.append) == (1, None)  # said once
        assert len(said) == 2 and all("training on 1 thread" in line for line in said)
    finally:
        torch.set_num_threads(1)


class FakeClock:
    """Steps take `seconds[threads]` each, whatever the machine does (time passes at each look)."""

    def __init__(self, seconds):
        self.seconds, self.now = seconds, 0.0

    def __call__(self):
        self.now += self.seconds[torch.get_num_threads()]
        return self.now


def epoch_threads(tuner, steps: int) -> list:
    """One epoch of `steps` steps in the tuner's chunks: the thread count of each step."""
    used = []
    for chunk in tuner.chunks(steps):
        used += [torch.get_num_threads()] * len(chunk)
    tuner.end_epoch()
    return used


@pytest.mark.parametrize("seconds, best", [({2: 1.0, 1: 0.2}, 1), ({2: 0.2, 1: 0.3}, 2)])
def test_the_tuner_keeps_the_faster_thread_count_and_tries_again_now_and_then(seconds, best):
    tuner = ThreadTuner(2, trial_steps=3, retune_every=3, clock=FakeClock(seconds))
    try:
        used = []
        for epoch in range(4):
            used += epoch_threads(tuner, 12)
            assert torch.get_num_threads() == 2  # evaluation at the fixed count
        trials = [2] * 4 + [1] * 4 + [best] * 4
        # epoch 3 tries again
        assert used[:12] == trials and used[12:36] == [best] * 24 and used[36:] == trials
        assert tuner.chosen == [best] * 4
    finally:
        torch.set_num_threads(1)


def test_an_epoch_much_slower_than_the_last_makes_the_tuner_try_again():
    seconds = {2: 0.1, 1: 0.2}
    tuner = ThreadTuner(2, trial_steps=1, retune_every=100, clock=FakeClock(seconds), tune_evaluation=True)
    try:
        used = []
        for epoch in range(5):
            if epoch == 3:
                seconds[2] = 1.0  # another process took a core
            used += epoch_threads(tuner, 6)
        assert tuner.chosen == [2, 2, 2, 2, 1] and torch.get_num_threads() == 1  # evaluation follows
        assert used[24:] == [2, 2, 1, 1, 1, 1]
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("case, seconds, steps, used, chosen", [
    ("short steps: 8 timed at 2 threads, 4 at 1", {2: 0.125, 1: 0.25}, 20, [2] * 9 + [1] * 5 + [2] * 6, 2),
    ("an epoch shorter than its trials keeps the faster yet", {2: 0.25, 1: 0.125}, 8, [2] * 5 + [1] * 3, 1),
])
def test_a_trial_lasts_its_seconds_not_only_its_steps(case, seconds, steps, used, chosen):
    """A few steps of a few milliseconds time the scheduler, not the load: a trial lasts one
    second here (trial_seconds), whatever its steps take."""
    tuner = ThreadTuner(2, trial_steps=3, trial_seconds=1.0, clock=FakeClock(seconds))
    try:
        assert epoch_threads(tuner, steps) == used and tuner.chosen == [chosen]
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_tuned_threads_change_no_number(shape, monkeypatch):
    if shape == "wide":
        monkeypatch.setattr(__import__(__name__), "D", 96)
        monkeypatch.setattr(__import__(__name__), "K", 24)
    if not products_thread_invariant([8, 2], D, K, 2):
        pytest.skip("this BLAS rounds products differently at 2 threads: the engine never tunes there "
                    "(test_thread_choice_falls_back_to_one_when_the_blas_is_not_batch_exact)")
    data = make_data(3, val=True)
    targets = make_targets("partial", data, 3)
    hp = hyper([0.1, 0.03, 0.2], [1e-3, 0.0, 5e-2], [0.9, 0.5, 0.0], [0.98, 0.9, 1.0])
    torch.set_num_threads(2)  # the tuner evaluates at its fixed count (2): so does the plain run
    plain = train(data, targets, init_weights(3), hp, 3, 8, [1, 2, 3])
    clock = FakeClock({2: 1.0, 1: 0.1})  # one thread "wins" the trials
    tuned = train(data, targets, init_weights(3), hp, 3, 8, [1, 2, 3],
                        tuner=ThreadTuner(2, 2, clock=clock))
    torch.set_num_threads(1)
    assert torch.equal(plain.weight, tuned.weight) and plain.history == tuned.history


def test_the_blas_probe_finds_batch_items_equal_to_lone_products_on_one_thread():
    torch.set_num_threads(1)
    assert batched_products_match_lone([128, 81], 64, 10) and batched_products_match_lone([32], 512, 100)


def _reference_sgd(data, init, lr, wd, mom, gamma, epochs, batch, seed, loss_of=None):
    """nn.Linear(bias=False) + torch.optim.SGD + CrossEntropyLoss on the same batches, with the
    per-batch metrics a person would compute by hand. `loss_of(logits, positions)` replaces the
    loss (positions index the run's training rows)."""
    lin = torch.nn.Linear(D, K, bias=False)
    with torch.no_grad():
        lin.weight.copy_(init)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    loss_fn = torch.nn.CrossEntropyLoss()
    history = []
    rows, noisy, true = data.train_rows[0], data.noisy_labels[0], data.true_labels[0]
    for epoch in range(epochs):
        perm = shuffled_positions(N_TRAIN, [seed], epoch)[0]
        loss_sum, hits = 0.0, torch.zeros(4)
        for start in range(0, N_TRAIN, batch):
            pos = perm[start:start + batch]
            out = lin(data.features[rows[pos]])
            loss = loss_fn(out, noisy[pos]) if loss_of is None else loss_of(out, pos)
            top2 = out.detach().topk(2, -1).indices
            for i, lab in enumerate((noisy[pos], true[pos])):
                hit = top2 == lab[:, None]
                hits[2 * i] += hit[:, 0].sum()
                hits[2 * i + 1] += hit.any(-1).sum()
            loss_sum += loss.item() * len(pos)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            test_pred = lin(data.test_features).topk(2, -1).indices
        pct = [float(h) * 100 / N_TRAIN for h in hits]
        test_hit = test_pred == data.test_labels[:, None]
        history.append({"train_loss": loss_sum / N_TRAIN, "train_acc": pct[0], "train_top2": pct[1],
                        "train_acc_true": pct[2], "train_top2_true": pct[3],
                        "test_acc": float(test_hit[:, 0].double().mean() * 100),
                        "test_top2": float(test_hit.any(-1).double().mean() * 100)})
    return lin.weight.detach(), history


def test_one_sgd_step_equals_torch_sgd():
    data = make_data(1)
    init = init_weights(1)
    state = train(data, Targets("hard", data.noisy_labels, smoothing=torch.zeros(1)), init,
                        hyper([0.3], [0.01], [0.9], [0.98]), 1, N_TRAIN, [5])
    ref_w, ref_hist = _reference_sgd(data, init[0], 0.3, 0.01, 0.9, 0.98, 1, N_TRAIN, 5)
    torch.testing.assert_close(state.weight[0], ref_w, atol=1e-6, rtol=0)
    assert state.history[0][0]["train_loss"] == pytest.approx(ref_hist[0]["train_loss"], abs=1e-6)
    assert state.history[0][0]["lr"] == pytest.approx(0.3)


def test_several_epochs_of_minibatch_sgd_equal_torch_sgd_and_metrics():
    """Momentum carried across batches and epochs, weight decay, lr * gamma^epoch, a last partial
    batch, and every per-epoch train metric (top-1 and top-2 against noisy and true labels)."""
    data = make_data(1, seed=3)
    init = init_weights(1, seed=3)
    epochs, batch = 3, 25  # 90 rows: batches of 25, 25, 25, 15
    state = train(data, Targets("hard", data.noisy_labels, smoothing=torch.zeros(1)), init,
                        hyper([0.2], [5e-3], [0.9], [0.8]), epochs, batch, [17])
    ref_w, ref_hist = _reference_sgd(data, init[0], 0.2, 5e-3, 0.9, 0.8, epochs, batch, 17)
    torch.testing.assert_close(state.weight[0], ref_w, atol=1e-5, rtol=0)
    for got, ref in zip(state.history[0], ref_hist):
        assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
        for name in ("train_acc", "train_acc_true", "train_top2", "train_top2_true", "test_acc", "test_top2"):
            assert got[name] == pytest.approx(ref[name], abs=1e-9), (got["epoch"], name, got[name], ref[name])
    assert [h["lr"] for h in state.history[0]] == pytest.approx([0.2, 0.2 * 0.8, 0.2 * 0.64])
    assert [h["epoch"] for h in state.history[0]] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["label_smoothing", "temperature"])
def test_smoothed_and_tempered_targets_train_as_their_torch_losses(kind):
    """The trainer applies --label-smoothing to hard labels and --temperature (with T^2) to soft
    targets, step for step as torch's losses under autograd."""
    data = make_data(1, seed=4)
    init = init_weights(1, seed=4)
    noisy = data.noisy_labels[0]
    if kind == "label_smoothing":
        targets = Targets("hard", data.noisy_labels, smoothing=torch.tensor([0.2]))
        loss_of = lambda out, pos: F.cross_entropy(out, noisy[pos], label_smoothing=0.2)  # noqa: E731
    else:
        t = 3.0
        teacher = torch.randn(1, K, D, generator=torch.Generator().manual_seed(9))
        teacher_logits = torch.bmm(data.features[data.train_rows], teacher.transpose(1, 2))
        q = distillation_targets(teacher_logits, torch.tensor([t]))
        targets = Targets("soft", q, temperature=torch.tensor([t]))
        loss_of = lambda out, pos: (  # noqa: E731
            t ** 2 * -(q[0, pos] * torch.log_softmax(out / t, -1)).sum(-1).mean())
    state = train(data, targets, init, hyper([0.2], [5e-3], [0.9], [0.8]), 2, 25, [17])
    ref_w, ref_hist = _reference_sgd(data, init[0], 0.2, 5e-3, 0.9, 0.8, 2, 25, 17, loss_of)
    torch.testing.assert_close(state.weight[0], ref_w, atol=1e-5, rtol=0)
    for got, ref in zip(state.history[0], ref_hist):
        assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)


def test_same_seeds_give_bit_identical_runs():
    def once():
        data = make_data(2, seed=1)
        return train(data, Targets("hard", data.noisy_labels, smoothing=torch.zeros(2)),
                           init_weights(2), hyper([0.1, 0.05], [1e-3, 1e-3], [0.9, 0.9], [0.98, 0.98]), 3, 16,
                           [4, 5])
    a, b = once(), once()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.momentum, b.momentum)
    assert a.history == b.history


def test_shuffling_depends_on_the_run_seed_only():
    a = shuffled_positions(50, [1, 2, 1], 0)
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(a[1], shuffled_positions(50, [2], 0)[0])
    assert not torch.equal(a[0], shuffled_positions(50, [1], 1)[0])  # a new order every epoch
    assert torch.equal(a[0].sort().values, torch.arange(50))


def test_best_snapshot_is_the_first_maximum_of_test_accuracy():
    data = make_data(1, seed=2)
    seen = []
    state = train(data, Targets("hard", data.noisy_labels, smoothing=torch.zeros(1)), init_weights(1),
                        hyper([0.5], [0.0], [0.9], [1.0]), 6, 8, [3],
                        on_epoch=lambda s: seen.append(s.weight.clone()))
    accs = [h["test_acc"] for h in state.history[0]]
    best = accs.index(max(accs)) + 1
    assert int(state.best['test'].epoch[0]) == best
    assert float(state.best['test'].acc[0]) == pytest.approx(max(accs))
    assert torch.equal(state.best['test'].weight[0], seen[best - 1][0])
    m = evaluate(data, state.best['test'].weight)
    assert float(m["test_acc"][0]) == pytest.approx(max(accs))


def test_a_tie_keeps_the_first_maximum():
    start = torch.zeros(2, K, D)
    snap = Snapshot.empty(start)
    snap.update(torch.tensor([50.0, 60.0]), 1, start + 1, start)
    snap.update(torch.tensor([50.0, 55.0]), 2, start + 2, start)   # run 0 ties its best: kept
    assert snap.epoch.tolist() == [1, 1] and torch.equal(snap.weight, start + 1)
    snap.update(torch.tensor([50.5, 60.0]), 3, start + 3, start)   # run 0 improves, run 1 ties
    assert snap.epoch.tolist() == [3, 1]
    assert torch.equal(snap.weight[0], start[0] + 3) and torch.equal(snap.weight[1], start[1] + 1)


def test_nan_loss_raises_with_epoch_and_run():
    data = make_data(3, scale=1e4)
    with pytest.raises(NonFiniteLoss) as err:
        train(data, Targets("hard", data.noisy_labels, smoothing=torch.zeros(3)), init_weights(3),
                    hyper([0.01, 1e30, 0.01], [0.0, 0.1, 0.0], [0.9, 0.9, 0.9], [1.0, 1.0, 1.0]), 3, 16,
                    [1, 2, 3])
    assert err.value.epoch == 1 and err.value.run == 1


def test_resume_equals_training_straight_through():
    data = make_data(2, seed=5, val=True)
    targets = Targets("hard", data.noisy_labels, smoothing=torch.zeros(2))
    hp = hyper([0.1, 0.3], [1e-3, 1e-2], [0.9, 0.8], [0.9, 0.95])
    straight = train(data, targets, init_weights(2), hp, 4, 16, [7, 8])
    half = train(data, targets, init_weights(2), hp, 2, 16, [7, 8])
    assert half.epoch == 2
    resumed = train(data, targets, None, hp, 4, 16, [7, 8], resume=copy.deepcopy(half))
    assert torch.equal(resumed.weight, straight.weight)
    assert torch.equal(resumed.momentum, straight.momentum)
    assert resumed.history == straight.history
    assert torch.equal(resumed.best['test'].epoch, straight.best['test'].epoch)
    assert torch.equal(resumed.best['val'].weight, straight.best['val'].weight)


def test_topk_hits_counts():
    logits = torch.tensor([[[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [5.0, 0.0, 4.0]]])
    top1, top2 = topk_hits(logits, torch.tensor([[1, 2, 1]]))
    assert top1.tolist() == [1] and top2.tolist() == [2]


def test_topk_hits_agree_with_topk_and_count_ties_and_nans_as_misses():
    torch.manual_seed(11)
    logits, labels = torch.randn(3, 200, 7), torch.randint(0, 7, (2, 3, 200))
    top2 = logits.topk(2, dim=-1).indices
    hit = top2 == labels.unsqueeze(-1)
    top1, top2_hits = topk_hits(logits, labels)
    assert torch.equal(top1, hit[..., 0].sum(-1)) and torch.equal(top2_hits, hit.any(-1).sum(-1))
    constant = torch.zeros(1, 4, 5)                     # every class tied: no hit, not 100%
    assert [h.tolist() for h in topk_hits(constant, torch.tensor([[0, 1, 2, 3]]))] == [[0], [0]]
    two_way = torch.tensor([[[1.0, 1.0, 0.0]]])         # label tied for first: a top-2 hit, not a top-1 hit
    assert [h.tolist() for h in topk_hits(two_way, torch.tensor([[1]]))] == [[0], [1]]
    nan = torch.tensor([[[float("nan"), 0.0, -1.0]]])
    assert [h.tolist() for h in topk_hits(nan, torch.tensor([[0]]))] == [[0], [0]]


def test_evaluate_metrics_against_torch():
    torch.manual_seed(12)
    test_x, test_y = torch.randn(40, D), torch.randint(0, K, (40,))
    zeros = torch.zeros(2, 10, dtype=torch.long)
    data = TrainData(torch.randn(10, D), zeros, zeros, zeros, test_x, test_y, num_classes=K)
    weight = torch.randn(2, K, D)
    got = evaluate(data, weight)
    for r in range(2):
        logits = test_x @ weight[r].T
        p = torch.softmax(logits, -1)
        assert got["test_loss"][r].item() == pytest.approx(F.cross_entropy(logits, test_y).item(), abs=1e-5)
        accuracy = (logits.argmax(-1) == test_y).float().mean().item() * 100
        assert got["test_acc"][r].item() == pytest.approx(accuracy)
        confidence = p.max(-1).values.mean().item() * 100
        assert got["test_confidence"][r].item() == pytest.approx(confidence, abs=1e-4)
        entropy = torch.distributions.Categorical(logits=logits).entropy().mean()
        assert got["test_entropy"][r].item() == pytest.approx(entropy.item(), abs=1e-5)
