"""Buffers grown by `unike.grow.append` hold what concatenation gives, reuse their room (one copy of the
appended rows, not of all), and leave every earlier view of them as it was."""
import torch
from torch import nn

from unike.grow import append


def _module():
    m = nn.Module()
    m.register_buffer("rows", torch.zeros(0, 3))
    m.register_buffer("cols", torch.zeros(3, 0))
    return m


def test_appends_equal_concatenation_along_either_dim_and_stay_buffers():
    m, rows, cols, views = _module(), torch.zeros(0, 3), torch.zeros(3, 0), []
    for i in range(9):
        new = torch.randn(i % 3 + 1, 3)
        append(m, "rows", new)
        append(m, "cols", new.T, 1)
        rows, cols = torch.cat([rows, new]), torch.cat([cols, new.T], 1)
        views.append((m.rows, rows.clone()))
        assert torch.equal(m.rows, rows) and torch.equal(m.cols, cols)
    assert dict(m.named_buffers()).keys() == {"rows", "cols"}
    assert all(torch.equal(view, value) for view, value in views)     # earlier views: as they were
    assert torch.equal(m.state_dict()["cols"].contiguous(), cols)


def test_the_room_is_reused_until_full_and_a_replaced_buffer_starts_a_new_one():
    m = _module()
    append(m, "rows", torch.randn(2, 3))
    start = m.rows.data_ptr()
    append(m, "rows", torch.randn(1, 3))
    assert m.rows.data_ptr() == start                                 # written into the room behind it
    m.rows = m.rows[:1].clone()                                       # replaced (a load, a truncation)
    before = m.rows.clone()
    append(m, "rows", torch.ones(1, 3))
    assert m.rows.data_ptr() != start and torch.equal(m.rows[:1], before) and torch.equal(m.rows[1], torch.ones(3))


def test_a_rolled_back_view_is_untouched_and_the_next_append_overwrites_what_followed_it():
    m = _module()
    append(m, "rows", torch.zeros(2, 3))
    kept = m.rows                                                     # what a transaction keeps
    append(m, "rows", torch.ones(2, 3))                               # an edit that then fails
    m.rows = kept                                                     # rolled back
    assert torch.equal(m.rows, torch.zeros(2, 3))
    append(m, "rows", torch.full((1, 3), 2.0))
    assert torch.equal(m.rows, torch.cat([torch.zeros(2, 3), torch.full((1, 3), 2.0)]))


def test_a_large_append_keeps_an_eighth_spare_not_a_copy_of_itself():
    m = _module()
    append(m, "rows", torch.randn(800, 3))                            # e.g. a fit's 15,000 memory entries
    assert 800 < len(m._rooms["rows"]) <= 800 * 9 // 8 + 8
