"""Faults in the middle of fit / edit / save, and random sequences of fit / edit / reset / detach / save /
load / failed edits on the tiny model, with the editor's invariants checked after every call."""
import random

import pytest
import torch

import unike
import unike.editor as editor_module
import unike.persist as persist_module
from guard import FAST, assert_same, hooks_of, logits, snapshot, tiny_probe


@pytest.fixture(scope="module")
def tiny():
    model, processor = unike.load_tiny()
    world = unike.SynthWorld(seed=0)
    cases = world.edit_cases("vqa", n=8, seed=21) + world.edit_cases("caption", n=4, seed=22)
    return model, processor, world, cases, tiny_probe(processor, world)


class Fault(Exception):
    pass


def _fail_at(model, call: int, error=Fault):
    """A plain torch hook on the LM head that raises `error` at its `call`-th call (a fault mid-run)."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if count[0] == call:
            raise error("injected fault")
    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.fixture
def editor(tiny):
    model, processor, world, cases, _ = tiny
    # trained against every negative, an edit on this small fit runs all its steps: the 9th call is inside it
    ed = unike.UniKE(model, processor, unike.UniKEConfig(**FAST, scoped_negatives=False))
    ed.fit(world.triplets(n=24, seed=3), progress=False)
    ed.edit(cases[0])
    yield ed
    ed.detach()


# the LM head's 1st call is the base-states pass, the 3rd the first training step, the 9th a later one
@pytest.mark.parametrize("call, error", [(1, Fault), (3, KeyboardInterrupt), (9, torch.OutOfMemoryError), (5, Fault)])
def test_fault_inside_edit_leaves_the_editor_as_it_was(tiny, editor, call, error):
    model, _, _, cases, probe = tiny
    before = snapshot(model, probe, editor)
    handle = _fail_at(model, call, error)
    try:
        with pytest.raises(error, match="injected"):
            editor.edit(cases[1])
    finally:
        handle.remove()
    assert_same(before, snapshot(model, probe, editor))
    editor.edit(cases[1])                         # and it still edits
    assert editor.n_edits == 2


def test_fault_inside_fit_leaves_the_editor_as_it_was(tiny, editor, monkeypatch):
    model, _, world, _, probe = tiny
    before = snapshot(model, probe, editor)
    handle = _fail_at(model, 3)                   # while collecting the triplets' states
    try:
        with pytest.raises(Fault):
            editor.fit(world.triplets(n=24, seed=4), progress=False)
    finally:
        handle.remove()
    assert_same(before, snapshot(model, probe, editor))

    real = editor_module.train_spaces

    def train_then_fail(*args, **kwargs):        # the spaces are trained in place, then the fault
        real(*args, **kwargs)
        raise Fault("after training the spaces")
    monkeypatch.setattr(editor_module, "train_spaces", train_then_fail)
    with pytest.raises(Fault):
        editor.fit(world.triplets(n=24, seed=4), progress=False)
    assert_same(before, snapshot(model, probe, editor))
    monkeypatch.undo()

    calls = [0]
    real_calibrate = unike.memory.LatentMemory.calibrate

    def calibrate_then_fail(self, *args):         # the first layers' memories are already replaced
        calls[0] += 1
        if calls[0] == 3:
            raise Fault("in the third layer")
        return real_calibrate(self, *args)
    monkeypatch.setattr(unike.memory.LatentMemory, "calibrate", calibrate_then_fail)
    with pytest.raises(Fault):
        editor.fit(world.triplets(n=24, seed=4), progress=False)
    assert_same(before, snapshot(model, probe, editor))


def test_evaluate_stopped_by_a_fault_leaves_no_edit(tiny, editor, monkeypatch):
    model, _, _, cases, probe = tiny

    def score_fails(*args):             # sequential mode: the fault comes after three edits
        raise Fault("while scoring")
    monkeypatch.setattr(unike.metrics, "_score", score_fails)
    with pytest.raises(Fault):
        unike.evaluate(editor, cases[1:4], mode="sequential", k=3, progress=False)
    stopped = snapshot(model, probe, editor)
    assert editor.n_edits == 0
    editor.reset()
    assert_same(stopped, snapshot(model, probe, editor))


def test_fault_inside_save_keeps_the_earlier_save(tiny, editor, tmp_path, monkeypatch):
    model, processor, _, cases, probe = tiny
    folder = editor.save(tmp_path / "state")
    saved = logits(model, probe)
    editor.edit(cases[2])

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(persist_module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        editor.save(folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["unike.json", "unike.safetensors"]   # no leftovers

    replace, calls = persist_module.os.replace, [0]

    def replace_once(*args):                      # the tensor file is replaced, then the JSON fails
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("power cut")
        return replace(*args)
    monkeypatch.setattr(persist_module.os, "replace", replace_once)
    with pytest.raises(OSError, match="power cut"):
        editor.save(folder)
    monkeypatch.undo()
    editor.detach()
    with pytest.raises(ValueError, match="does not match the checksum"):   # detected, never loaded half
        unike.UniKE.load(model, processor, folder)
    editor.__init__(model, processor, editor.config)     # the fixture's teardown detaches it again
    del saved


# ------------------------------------------------------------------------------------- random sequences
OPS = ("fit", "edit", "reset", "detach", "save", "load", "fault")


class Checker:
    """The invariants of an editor, checked after every call; counts how many were checked."""

    def __init__(self, model, probe, base, base_hooks, base_keys):
        self.model, self.probe, self.base = model, probe, base
        self.base_hooks, self.base_keys = base_hooks, base_keys
        self.checks = 0

    def check(self, cond, what):
        assert cond, what
        self.checks += 1

    def detached(self):
        self.check(torch.equal(logits(self.model, self.probe), self.base), "detached: logits equal the base model")
        self.check(hooks_of(self.model) == self.base_hooks, "detached: no hook left")
        self.check(list(self.model.state_dict()) == self.base_keys, "detached: state_dict keys as before")

    def attached(self, ed, n_edits, n_fit, fitted_logits):
        cfg, n = ed.config, ed.n_edits
        self.check(n == n_edits, f"n_edits {n} != {n_edits}")
        self.check(ed.fitted == (n_fit > 0), "fitted flag")
        self.check(len(ed.hooks) == 4 * len(ed.layer_ids) + 2, "four hooks per edited layer, the gate's, the model's")
        for l in ed.layer_ids:
            mem, patch = ed.memory[l], ed.neurons[l]
            self.check(int(mem.n_fit) == n_fit, f"layer {l}: n_fit")
            self.check(len(mem) == n_fit + (n if n_fit else 0), f"layer {l}: memory = fit + edits")
            self.check(patch.keys.shape[1] == n * cfg.n_neurons == len(patch.bias) == len(patch.values),
                       f"layer {l}: neurons = edits x n_neurons")
            self.check(patch.zeta.shape[0] == n and patch.pending is None, f"layer {l}: one ζ′ per edit, no pending")
            self.check((len(ed.layers[l].edited) == 0) == (n == 0), f"layer {l}: edited inputs iff edits")
            self.check(mem.keys.dtype == patch.keys.dtype == torch.float32, f"layer {l}: fp32 buffers")
        with ed.disabled():
            self.check(torch.equal(logits(self.model, self.probe), self.base), "disabled() gives the base model")
        if n == 0:
            self.check(torch.equal(logits(self.model, self.probe), fitted_logits), "no edits: the fitted model")


@pytest.mark.filterwarnings("ignore:the external memory is empty")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sequence_keeps_every_invariant(tiny, tmp_path, seed):
    model, processor, world, cases, probe = tiny
    rng = random.Random(seed)
    ops = list(OPS) + [rng.choice(("fit", "edit", "edit", "reset", "save", "load")) for _ in range(12 - len(OPS))]
    rng.shuffle(ops)
    base = logits(model, probe)
    check = Checker(model, probe, base, hooks_of(model), list(model.state_dict()))
    config = unike.UniKEConfig(**FAST)
    ed = unike.UniKE(model, processor, config)
    n_edits, n_fit, fitted_logits, saved = 0, 0, base, None
    log = []
    for step, op in enumerate(ops):
        log.append(op)
        attached = ed.hooks is not None
        if op in ("fit", "edit", "reset", "save") and not attached:
            with pytest.raises(RuntimeError, match="detached"):
                getattr(ed, op)(*{"fit": [[]], "edit": [cases[0]], "reset": [], "save": [tmp_path]}[op])
            check.detached()
            continue
        if op == "fit":
            n = rng.choice((16, 24))
            ed.fit(world.triplets(n=n, seed=100 + step), progress=False)
            n_edits, n_fit, fitted_logits = 0, n, logits(model, probe)
        elif op == "edit":
            ed.edit(cases[rng.randrange(len(cases))])
            n_edits += 1
        elif op == "reset":
            ed.reset()
            n_edits = 0
        elif op == "detach":
            ed.detach()
        elif op == "save":
            folder = tmp_path / f"save{step}"
            saved = (ed.save(folder), logits(model, probe), ed.state(), n_edits, n_fit, fitted_logits)
        elif op == "load":
            if attached:
                ed.detach()
            check.detached()
            if saved is None:
                ed = unike.UniKE(model, processor, config)
                n_edits, n_fit, fitted_logits = 0, 0, base
            else:
                folder, saved_logits, saved_state, n_edits, n_fit, fitted_logits = saved
                ed = unike.UniKE.load(model, processor, folder)
                check.check(torch.equal(logits(model, probe), saved_logits), "save -> load: identical logits")
                state = ed.state()
                check.check(all(torch.equal(v, state[k]) for k, v in saved_state.items()), "save -> load: same state")
        elif op == "fault":
            if not attached:
                continue
            before = snapshot(model, probe, ed)
            handle = _fail_at(model, rng.choice((1, 2, 4)))
            try:
                with pytest.raises(Fault):
                    ed.edit(cases[rng.randrange(len(cases))])
            finally:
                handle.remove()
            check.checks += assert_same(before, snapshot(model, probe, ed))
        if ed.hooks is None:
            check.detached()
        else:
            check.attached(ed, n_edits, n_fit, fitted_logits)
    ed.detach()
    check.detached()
    print(f"seed {seed}: {' '.join(log)}: {check.checks} invariant checks")
