"""`ChainCache`: one KV cache for a batch of chains, and the forwards that append to it.

Inference keeps K/V in preallocated slot tensors (`SlotCache`, `[batch, kv_heads, capacity,
head_dim]` per layer) that start with the prompt caches of the stages in use and grow by blocks
of columns. Every slot carries its `TokenMeta`. A chunk (shared content, a step's input, a
batch of decoded tokens) gets its mask from the visibility rule over the slots written so far
and its positions from each row's count of real tokens. Decoding keeps one mask row per request
over the whole capacity, asks the rule once per step what a decoded token sees, and updates
the mask in place from that (`start_decoding`, `decode`): a decode step is then a fixed-shape
forward with no host synchronisation, which can be compiled and replayed with CUDA graphs.
`free_hidden` drops the segments no later step can see (the compressor's passages once stage A
is done), which the paper leaves on the table.

Training's one-pass forward (`fthss.training.forward`) runs a whole `Layout` over the same
prompt caches under the same visibility rule, so engine and training agree by construction, up
to float.
"""

from __future__ import annotations

from functools import cached_property

import torch
from transformers import DynamicCache

from fthss.layout.sequence import positions, prompt_slots
from fthss.layout.visibility import Kind, TokenMeta, visibility
from fthss.models.base import BaseModel
from fthss.models.lora import LoraBank, Route
from fthss.prompts.stage import LayerKV, side_by_side

BLOCK = 256  # columns the cache grows by: few distinct shapes, so few CUDA graphs
PREFILL_TOKENS = 16384  # tokens (batch x columns) per prefill forward
# padded tokens a prefill forward's fixed cost is taken to be worth, in `row_groups`' choice:
# about a forward's launches on a GPU; a CPU's is less, so the choice errs toward fewer groups
GROUP_OVERHEAD = 512


class SlotCache(DynamicCache):
    """K/V in preallocated tensors, one pair per layer. A chunk is written at the columns
    `start, start + 1, ...` (`start` is a tensor, so a captured graph replays with a new value)
    and attention reads every column: the mask hides those not written or not visible."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.keys, self.values = keys, values
        self.start = torch.zeros((), dtype=torch.long, device=keys[0].device)
        # columns attention reads: the first `read` (eager forwards skip the unwritten ones),
        # or all of them (None: a compiled step needs the same shapes at every token)
        self.read: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        columns = self.start + torch.arange(key_states.shape[2], device=key_states.device)
        self.keys[layer_idx].index_copy_(2, columns, key_states)
        self.values[layer_idx].index_copy_(2, columns, value_states)
        return self.keys[layer_idx][:, :, : self.read], self.values[layer_idx][:, :, : self.read]


def _blocks(columns: int) -> int:
    """The capacity that holds `columns`: a whole number of blocks, at least one."""
    return -(-max(columns, 1) // BLOCK) * BLOCK


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """Allocated eagerly and marked static, so a CUDA graph may write into it in place (a
    tensor first allocated inside a graph would be overwritten by the next replay)."""
    if tensor.is_cuda:
        torch._dynamo.mark_static_address(tensor)
    return tensor


def compiled_decode_step(base: BaseModel, backend: str = "inductor", fullgraph: bool = False):
    """`BaseModel.forward` for one decoded token per row, compiled: with CUDA graphs
    ("reduce-overhead") on a GPU, as gpt-fast does. The first compile is for static shapes; when
    the capacity (or the batch size) changes, torch recompiles once with that dimension
    dynamic, so a whole benchmark compiles two or three times, not once per capacity (minutes
    each for an 8B model, and past torch's recompile limit the step would quietly run eager).
    CUDA graphs still record one graph per shape, which is cheap. A replay overwrites the
    previous one's outputs, so logits are cloned, and each replay is marked as a new step."""
    cuda = base.device.type == "cuda"
    forward = torch.compile(base.forward, backend=backend, fullgraph=fullgraph, dynamic=None,
                            mode="reduce-overhead" if cuda and backend == "inductor" else None)

    def step(cache, position_ids, *, input_ids, attention_mask, route=None):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return forward(cache, position_ids, input_ids=input_ids, attention_mask=attention_mask,
                       route=route).clone()
    return step


def _meta_like(meta: TokenMeta, batch: int, columns: int) -> TokenMeta:
    """`columns` PAD slots per row, on `meta`'s device."""
    return TokenMeta.fill(batch, columns, Kind.PAD).to(meta.kind.device)


def _fields(meta: TokenMeta) -> tuple[torch.Tensor, ...]:
    return meta.kind, meta.step, meta.stage, meta.visible


def _part(meta: TokenMeta, rows: slice = slice(None), columns: slice = slice(None)) -> TokenMeta:
    return TokenMeta(*(t[rows, columns] for t in _fields(meta)))


def _widths(meta: TokenMeta) -> torch.Tensor:
    """Per row of a right-padded chunk: the columns up to and with its last real token."""
    index = torch.arange(1, meta.length + 1, device=meta.kind.device)
    return torch.where(meta.is_real, index, 0).max(dim=1).values


def row_groups(widths: list[int], overhead: int | None = None, starts: list[int] | None = None,
               column_cost: float = 0.0) -> list[tuple[slice, int]]:
    """Contiguous groups of rows for a prefill, each run padded only to its own widest chunk:
    `(rows, width)` pairs covering every row in order. The split minimises the padded tokens
    (rows x width, summed over groups) plus `overhead` (default GROUP_OVERHEAD) per forward,
    by dynamic programming over the cut points; a group of width 0 (rows with nothing to
    encode) runs no forward. Rows of like widths make one group; a long chunk among short
    ones (a request joining a running batch with its shared content) makes its own, so its
    batch-mates' steps are not padded to its length.

    With `starts` (per row, the column its chunk would be written from: a group writes from
    its rows' latest) a group's tokens also cost `column_cost` per column they attend over
    (rows x width x column_cost x (latest start + width)): rows whose histories differ much in
    length are then kept apart, so a short history is not padded to a long one's."""
    overhead = GROUP_OVERHEAD if overhead is None else overhead
    n = len(widths)

    def running_max(values) -> torch.Tensor:  # [i, j] = max(values[i..j]) for j >= i
        return torch.triu(torch.tensor(values, dtype=torch.float64).expand(n, n)).cummax(
            dim=1).values
    widest = running_max(widths)
    latest = running_max(starts) if starts is not None else torch.zeros(n, n, dtype=torch.float64)
    best = torch.zeros(n + 1, dtype=torch.float64)  # best[j]: the least cost of rows [0, j)
    cut = [0] * (n + 1)  # cut[j]: where the last group of that split starts
    for j in range(n):
        spans = widest[: j + 1, j]  # the width of a last group [i, j] for each i
        columns = latest[: j + 1, j] + spans  # the columns its tokens attend over
        rows = torch.arange(j + 1, 0, -1, dtype=torch.float64)
        cost = (best[: j + 1] + rows * spans * (1 + column_cost * columns)
                + overhead * (spans > 0))
        cut[j + 1] = int(cost.argmin())
        best[j + 1] = cost[cut[j + 1]]
    groups, end = [], n
    while end > 0:
        start = cut[end]
        groups.append((slice(start, end), max(widths[start:end])))
        end = start
    return groups[::-1]


def _as_rows(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """Row indices (ascending) as a slice when they are contiguous (views, no copy), else as
    an index tensor."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


class ChainCache:
    """One KV cache for a batch of chains (see the module doc): the prompt slots of the stages
    in use, then content, every slot with its `TokenMeta`.

    Args (of `__init__`):
        base: the frozen base model.
        prompts: `prompts[s]`, stage s's prompt cache (stage id = index).
        batch_size: rows (one request each).
        decode_step: a compiled `BaseModel.forward` for decoding (`compiled_decode_step`).
        bank: the lora stages' deltas by the same stage ids.

    `append` / `append_causal` prefill a chunk and return logits, `start_decoding` and
    `decode` generate token by token, `free_hidden` drops what no later step can see,
    `add_rows` / `keep_rows` let requests join and leave the batch.
    """

    def __init__(self, base: BaseModel, prompts: list[list[LayerKV]], batch_size: int,
                 decode_step=None, bank: LoraBank | None = None):
        """`prompts[s]` is stage s's prompt cache (stage id = index), all made for the same C.
        `decode_step` replaces `BaseModel.forward` for decode steps (a compiled one). `bank`:
        the LoRA deltas of the stages by the same ids (None: no lora stage), through which
        every token is computed by the stage that owns it."""
        self.base, self.batch_size, self._decode_step = base, batch_size, decode_step
        self.bank = bank
        prompt_meta, self.first_position = prompt_slots(
            [layers[0][0].shape[2] for layers in prompts])
        self._prompt_meta = prompt_meta.to(base.device)
        self._prompt_kv = side_by_side(prompts)  # what every row's first slots hold
        self.length, self.capacity = 0, 0  # columns written, columns allocated
        self.batch_size = 0
        self.slots = _meta_like(self._prompt_meta, 0, 0)
        shape = (0, base.num_kv_heads, 0, base.head_dim)
        empty = [torch.empty(shape, dtype=base.dtype, device=base.device)
                 for _ in range(base.num_layers)]
        self.store = SlotCache(empty, [t.clone() for t in empty])
        self._resize(self._prompt_meta.length)
        self.length = self._prompt_meta.length
        self.next_position = torch.zeros(0, dtype=torch.long, device=base.device)
        self.add_rows(batch_size)
        self.decode_mask: torch.Tensor | None = None
        self._sees_itself = self._sees_earlier = None  # per row, from the rule (start_decoding)
        self._decode_start, self._decode_rows = 0, slice(None)

    @cached_property
    def column_cost(self) -> float:
        """A token's work per column it attends over (QK and PV: 2 multiply-adds per head
        dimension), relative to its work in a decoder layer's weights: `row_groups`' price of
        attending over a longer history's padding."""
        layers = getattr(self.base.model.get_decoder(), "layers", None)
        layer = (sum(p.numel() for p in layers[0].parameters()) if layers is not None
                 else sum(p.numel() for p in self.base.model.parameters()) / self.base.num_layers)
        return 2 * self.base.config.num_attention_heads * self.base.head_dim / layer

    def add_rows(self, count: int) -> None:
        """`count` rows after the others (requests joining the batch): each holds the prompt
        slots, then padding up to the columns written so far, and its positions start at C."""
        if count <= 0:
            return
        prompt = self._prompt_meta.length
        for tensors, layers in ((self.store.keys, [k for k, _ in self._prompt_kv]),
                                (self.store.values, [v for _, v in self._prompt_kv])):
            for i, old in enumerate(tensors):
                new = old.new_zeros(count, old.shape[1], old.shape[2], old.shape[3])
                if prompt:
                    new[:, :, :prompt] = layers[i]
                tensors[i] = _static(torch.cat([old, new]))
        added = _meta_like(self.slots, count, self.capacity)
        for mine, theirs in zip(_fields(added), _fields(self._prompt_meta), strict=True):
            mine[:, :prompt] = theirs
        self.slots = TokenMeta(*(torch.cat(pair) for pair in zip(
            _fields(self.slots), _fields(added), strict=True)))
        self.next_position = torch.cat([self.next_position, torch.full(
            (count,), self.first_position, dtype=torch.long, device=self.base.device)])
        self.batch_size += count
        self.decode_mask = None  # made again by the next `start_decoding`

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep the rows `rows` (indices, in their new order) and drop the others (requests
        leaving the batch). Columns stay as they are: `free_hidden` gives back those no row
        uses any more."""
        for tensors in (self.store.keys, self.store.values):
            for i, old in enumerate(tensors):
                tensors[i] = _static(old[rows])
        self.slots = TokenMeta(*(t[rows] for t in _fields(self.slots)))
        self.next_position = self.next_position[rows]
        self.batch_size = len(rows)
        self.decode_mask = None

    def _route(self, owners: torch.Tensor) -> Route | None:
        """Each token through its owner's deltas (`owners`: stage ids, -1 for none)."""
        return None if self.bank is None else Route(self.bank, owners)

    def _resize(self, needed: int) -> None:
        """Make the capacity the smallest multiple of BLOCK that holds `needed` columns,
        keeping the first `self.length` (those in use)."""
        capacity = _blocks(needed)
        if capacity == self.capacity:
            return
        keep = min(self.length, capacity)
        for tensors in (self.store.keys, self.store.values):
            for i, old in enumerate(tensors):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :keep] = old[:, :, :keep]
                tensors[i] = _static(new)
        slots = _meta_like(self.slots, self.batch_size, capacity)
        for new, old in zip(_fields(slots), _fields(self.slots), strict=True):
            new[:, :keep] = old[:, :keep]
        self.slots, self.capacity = slots, capacity

    def reserve(self, columns: int) -> None:
        """Room for `columns` more slots (a step's decoding), so it does not reallocate midway."""
        if self.length + columns > self.capacity:
            # a quarter more than needed: the next steps' few tokens (a marker, a short answer)
            # fit without copying the whole cache, and a growing chain copies it a logarithmic
            # number of times, not once per step
            needed = self.length + columns
            self._resize(needed + needed // 4)

    def _write(self, meta: TokenMeta) -> None:
        end = self.length + meta.length
        for mine, theirs in zip(_fields(self.slots), _fields(meta), strict=True):
            mine[:, self.length:end] = theirs
        self.store.start.fill_(self.length)
        self.length = end

    def append(self, input_ids: torch.Tensor, meta: TokenMeta, last_only: bool = False
               ) -> torch.Tensor:
        """Run a `[batch, q]` chunk (padding marked in `meta`) and return its logits
        `[batch, q, vocab]`, or with `last_only` those of each row's last real token
        `[batch, vocab]` (computing no others: a long prefill needs only one row of logits).

        Rows run in groups, each padded only to its own longest chunk, and each group writes
        right after the last slot its rows hold, not after the batch's last column: a request
        joining a running batch fills the padding its row holds there, so it neither attends
        over its batch-mates' columns nor makes the cache longer by its whole chunk. The groups
        (`row_groups`, over the rows ordered by chunk width, then by where they end) keep rows
        of unlike widths apart, and unlike histories too (members of a running batch at
        different rounds of their chains), so that no chunk is padded to a longer one's width
        nor attends over a longer history's padding. A group's long chunk runs in pieces of at
        most PREFILL_TOKENS tokens per forward, which bounds the activations and the mask a
        prefill needs. Where a group computes no logits (its padding, a row with nothing to
        encode) they are zeros."""
        meta, input_ids = meta.to(self.base.device), input_ids.to(self.base.device)
        self.base.check_positions(positions(meta, self.next_position))
        widths = _widths(meta)
        last = (widths - 1).clamp(min=0)  # per row, its last real token's index in the chunk
        ends = self._pack_for(widths)
        end_of = ends.tolist()
        groups = [(_as_rows(rows, self.base.device), width, max(end_of[r] for r in rows))
                  for rows, width in self._groups(widths.tolist(), end_of)]
        length = max([self.length] + [first + width for _, width, first in groups])
        self.reserve(length - self.length)
        shape = (self.batch_size, *((self.base.vocab_size,) if last_only
                                    else (meta.length, self.base.vocab_size)))
        out = None
        for rows, width, first in groups:
            logits = self._append_rows(rows, first, input_ids[rows, :width],
                                       _part(meta, rows, slice(0, width)),
                                       last[rows] if last_only else None)
            out = logits.new_zeros(shape) if out is None else out
            out[rows, : logits.shape[1]] = logits
        self.length = length
        self.next_position = self.next_position + meta.is_real.sum(dim=1)
        return torch.zeros(shape, device=self.base.device) if out is None else out

    def _groups(self, widths: list[int], ends: list[int] | None) -> list[tuple[list[int], int]]:
        """The rows with something to encode, in groups for a prefill: `row_groups` over the
        rows ordered by chunk width, then by where their histories end (`ends`; None: all
        alike), as `(rows, width)` with each group's rows ascending."""
        ends = ends or [0] * len(widths)
        order = sorted((r for r in range(len(widths)) if widths[r]),  # 0: nothing to encode
                       key=lambda r: (widths[r], ends[r]))
        return [(sorted(order[members]), width) for members, width in row_groups(
            [widths[r] for r in order], starts=[ends[r] for r in order],
            column_cost=self.column_cost)]

    def _pack_for(self, widths: torch.Tensor) -> torch.Tensor:
        """Per row, the columns up to its last slot in use (a row's slots after it are
        padding), after packing every row's slots to the left when the chunks about to be
        written (`widths` per row) would attend over more padding inside the rows than a
        forward is worth (`GROUP_OVERHEAD`, at `column_cost` per column): a row that decoded
        beside a longer one wrote its tokens after the longer one's last column, and its next
        long chunk (a 1,000-token input) would otherwise attend over the gap."""
        if not self.length:
            return torch.zeros_like(widths)
        held = self.slots.kind[:, : self.length] != Kind.PAD
        ends = torch.where(held, torch.arange(1, self.length + 1, device=held.device), 0).max(
            dim=1).values
        gaps = ends - held.sum(dim=1)  # padding inside each row
        if float((widths * gaps).sum()) * self.column_cost <= GROUP_OVERHEAD:
            return ends
        keep = torch.zeros_like(self.slots.kind, dtype=torch.bool)
        keep[:, : self.length] = held
        self._compact(keep)
        return held.sum(dim=1)

    def _append_rows(self, rows: slice | torch.Tensor, first: int, input_ids: torch.Tensor,
                     meta: TokenMeta, last: torch.Tensor | None) -> torch.Tensor:
        """`append` for one group of rows, their chunk (`[rows, width]`) written from column
        `first` on (padding there in every row of the group): slots and K/V of those rows'
        cache (views of it for a slice of rows; for an index, copies whose new columns are
        written back), in pieces of at most PREFILL_TOKENS tokens. The logits of every token,
        or with `last` per row those of the token at that index only."""
        written = slice(first, first + meta.length)
        used = slice(0, written.stop)  # the columns the chunk reads and writes
        store = SlotCache([k[rows, :, used] for k in self.store.keys],
                          [v[rows, :, used] for v in self.store.values])
        slots = _part(self.slots, rows, used)
        for mine, theirs in zip(_fields(slots), _fields(meta), strict=True):
            mine[:, written] = theirs
        logits = self._encode_rows(store, slots, first, input_ids, meta, last,
                                   self.next_position[rows])
        if isinstance(rows, torch.Tensor):  # copies: their new columns go back into the cache
            for mine, theirs in zip(_fields(self.slots), _fields(slots), strict=True):
                mine[rows, written] = theirs[:, written]
            for tensors, copies in ((self.store.keys, store.keys),
                                    (self.store.values, store.values)):
                for layer, copy in zip(tensors, copies, strict=True):
                    layer[rows, :, written] = copy[:, :, written]
        return logits

    def _encode_rows(self, store: SlotCache, slots: TokenMeta, first: int,
                     input_ids: torch.Tensor, meta: TokenMeta, last: torch.Tensor | None,
                     next_position: torch.Tensor) -> torch.Tensor:
        """The forwards of `_append_rows`: the group's chunk in pieces, into `store`
        (`next_position`: the group's rows' next positions)."""
        width = max(1, PREFILL_TOKENS // next_position.shape[0])
        pieces = []
        for start in range(0, meta.length, width):
            end = min(start + width, meta.length)
            piece = _part(meta, columns=slice(start, end))
            store.start.fill_(first + start)
            store.read = first + end
            mask = visibility(_part(slots, columns=slice(0, first + end)), end - start)
            at = None if last is None else (last - start).clamp(0, end - start - 1)
            logits = self._logits(store, positions(piece, next_position), at,
                                  input_ids=input_ids[:, start:end],
                                  attention_mask=self.base.attention_mask(mask),
                                  route=self._route(piece.stage))
            next_position = next_position + piece.is_real.sum(dim=1)
            if last is None:
                pieces.append(logits)
            elif start == 0:
                pieces = [logits]
            else:  # rows whose last real token lies in this piece
                pieces = [torch.where((last >= start)[:, None], logits, pieces[0])]
        return pieces[0] if last is not None else torch.cat(pieces, dim=1)

    def _logits(self, cache, pos, at: torch.Tensor | None, **inputs) -> torch.Tensor:
        """`BaseModel.forward`'s logits for every token, or per row only those of the token at
        index `at` (`[batch, vocab]`; the model computes no others)."""
        kept, where = torch.unique(at, return_inverse=True) if at is not None else (None, None)
        logits = self.base.forward(cache, pos, logits_at=kept, **inputs)
        if at is None:
            return logits
        return logits[torch.arange(logits.shape[0], device=logits.device), where]

    def append_causal(self, prompt: torch.Tensor, input_ids: torch.Tensor, meta: TokenMeta
                      ) -> torch.Tensor:
        """Text mode's prefill, on the causal path: the cache holds one stage's prompt slots
        (a prompt or lora stage: embeddings) and nothing else, and the chunk (`[batch, q]`,
        right-padded) is plain text after it, so every real token sees exactly the tokens before it.
        Then the prompt embeddings (`prompt`, `[N, hidden]`) are re-encoded together with the chunk
        in one forward with no mask, as PEFT + `generate` runs a prompt-tuned model: SDPA takes its
        causal kernel, which skips the blocks above the diagonal that an explicit mask makes it
        compute. The prompt's K/V come out as the cached ones (within float) and overwrite them.
        Rows run in groups of like widths (in or out of slot order), each padded to its own
        longest chunk only (`row_groups`), a forward taking at most PREFILL_TOKENS tokens.
        Returns the logits of each row's last real token, `[batch, vocab]` (zeros for a row
        with none)."""
        n = prompt.shape[0]
        if self.length != n or self.first_position != n:
            raise ValueError("append_causal needs a cache holding one stage's prompt only")
        meta, input_ids = meta.to(self.base.device), input_ids.to(self.base.device)
        pos = positions(meta, self.next_position)
        self.base.check_positions(pos)
        self.reserve(meta.length)
        self._write(meta)
        widths = _widths(meta)
        last = n + (widths - 1).clamp(min=0)
        prompt = prompt.to(self.base.device, self.base.dtype)
        prompt_pos = torch.arange(n, device=input_ids.device)
        out = None
        for rows_alike, width in self._groups(widths.tolist(), None):
            columns = n + width
            per_forward = max(1, PREFILL_TOKENS // columns)
            for start in range(0, len(rows_alike), per_forward):
                group = _as_rows(rows_alike[start:start + per_forward], self.base.device)
                ids = input_ids[group, :width]
                embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), self.base.embed(ids)], 1)
                cache = DynamicCache()  # fresh: no mask to build, so attention runs causal
                owners = torch.cat([self.slots.stage[group, :n], meta.stage[group, :width]], 1)
                logits = self._logits(cache, torch.cat([prompt_pos.expand(ids.shape[0], -1),
                                                        pos[group, :width]], dim=1),
                                      last[group], inputs_embeds=embeds,
                                      route=self._route(owners))
                out = logits.new_zeros(self.batch_size, logits.shape[1]) if out is None else out
                out[group] = logits
                for i, layer in enumerate(cache.layers):
                    self.store.keys[i][group, :, :columns] = layer.keys
                    self.store.values[i][group, :, :columns] = layer.values
        self.next_position = self.next_position + meta.is_real.sum(dim=1)
        return torch.zeros(self.batch_size, self.base.vocab_size,
                           device=self.base.device) if out is None else out

    def start_decoding(self, query: TokenMeta) -> None:
        """Before a step decodes: each row's mask over the slots so far, as the rule gives it
        for the row's first output token (`query`, `[batch, 1]`: the step's OUTPUT metadata,
        or PAD for a row that does not decode)."""
        query = query.to(self.base.device)
        written = TokenMeta(*(t[:, : self.length] for t in _fields(self.slots)))
        # The rule is asked once per step, for two of the row's output tokens appended (every
        # token a row decodes in the step has the same metadata): the first one's view of the
        # slots so far is the mask row; its own column says whether a decoded token sees
        # itself, and the second one's column of the first whether a token sees those decoded
        # before it in the step. `decode` copies these into each new column.
        views = visibility(written.cat(query).cat(query), 2)[:, 0]  # [batch, 2, length + 2]
        self.decode_mask = torch.zeros(self.batch_size, 1, 1, self.capacity, dtype=torch.bool,
                                       device=self.base.device)
        self.decode_mask[:, 0, 0, : self.length] = views[:, 0, : self.length]
        self._sees_itself = views[:, 0, self.length]
        self._sees_earlier = views[:, 1, self.length]
        self._decode_start = self.length  # the first column decoding writes
        self._decode_query = query
        # the eager step runs only the rows from the first to the last that decode (a request
        # in a step with a given output, or joining, idles); a compiled step keeps the batch's
        # shape, so that one graph serves every step
        decoding = (query.kind[:, 0] != Kind.PAD).nonzero().flatten().tolist() \
            if self._decode_step is None else []
        self._decode_rows = slice(None)  # all of them
        if decoding and (decoding[0] > 0 or decoding[-1] + 1 < self.batch_size):
            self._decode_rows = slice(decoding[0], decoding[-1] + 1)

    def decode(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Append one decoded token per row (`tokens`, `[batch]`; rows not `live` write
        padding) and return the next logits `[batch, vocab]`. Only device work: no host sync."""
        if self.length >= self.capacity:
            self._resize(self.length + 1)
        if self.decode_mask.shape[-1] != self.capacity:
            grown = torch.zeros(self.batch_size, 1, 1, self.capacity, dtype=torch.bool,
                                device=self.base.device)
            grown[..., : self.decode_mask.shape[-1]] = self.decode_mask
            self.decode_mask = grown
        column = self.length
        query = self._decode_query
        kind = torch.where(live, query.kind[:, 0], torch.full_like(query.kind[:, 0], Kind.PAD))
        self.slots.kind[:, column] = kind
        self.slots.step[:, column] = query.step[:, 0]
        self.slots.stage[:, column] = query.stage[:, 0]
        self.slots.visible[:, column] = False
        # The row's mask for the new token, as the rule gave it in `start_decoding`: the new
        # column is the token itself, and the one before it (when this step decoded it) an
        # earlier token of the step. A row that has stopped keeps its step's view: its logits
        # are not used, and its row of the mask must not be empty (NaN).
        self.decode_mask[:, 0, 0, column] = self._sees_itself
        if column > self._decode_start:
            self.decode_mask[:, 0, 0, column - 1] = self._sees_earlier
        self.store.start.fill_(column)
        self.length += 1
        rows, store = self._decode_rows, self.store
        step, mask = self._decode_step, self.decode_mask
        self.store.read = None
        if step is None:  # eager: read only the columns written, of the rows that decode
            step, mask = self.base.forward, mask[rows, ..., : self.length]
            if rows != slice(None):
                store = SlotCache([k[rows] for k in self.store.keys],
                                  [v[rows] for v in self.store.values])
                store.start.fill_(column)
            store.read = self.length
        # lora stages only (the decode loop pays nothing otherwise): each row's new token
        # through its step's stage, an idle row's through none
        route = (None if self.bank is None else
                 self._route(torch.where(live, query.stage[:, 0], -1)[rows, None]))
        logits = step(store, self.next_position[rows, None], input_ids=tokens[rows, None],
                      attention_mask=self.base.attention_mask(mask), route=route)[:, -1]
        self.next_position = self.next_position + live.long()
        if rows == slice(None):
            return logits
        every = logits.new_zeros(self.batch_size, logits.shape[-1])  # the others': unused
        every[rows] = logits
        return every

    def retract(self, row: int, step: int, count: int) -> None:
        """Undo the last `count` tokens `row` decoded for `step` (generated past a stop string
        found later): their slots become padding and the row's positions step back."""
        if count <= 0:
            return
        ours = (self.slots.kind[row, : self.length] == Kind.OUTPUT) & \
               (self.slots.step[row, : self.length] == step)
        columns = ours.nonzero().flatten()[-count:]
        self.slots.kind[row, columns] = Kind.PAD
        self.next_position[row] -= len(columns)

    def keep_content(self, row: int, count: int) -> None:
        """Keep the first `count` content tokens of `row` (its slots after the prompt's) and
        make the others padding; the row's positions step back to follow them (text-cached
        mode: a stage's next step reads on from where its text parts from the cached one)."""
        content = self.slots.kind[row, : self.length] > Kind.PROMPT
        columns = content.nonzero().flatten()[count:]
        self.slots.kind[row, columns] = Kind.PAD
        self.next_position[row] = self.first_position + count

    @property
    def holds_prompts_only(self) -> bool:
        """No row holds anything but the prompt slots (text mode's causal path needs this)."""
        return self.length == self._prompt_meta.length

    def free_hidden(self, next_step: int | torch.Tensor, kept: torch.Tensor | None = None
                    ) -> None:
        """Drop every slot no step from `next_step` on can see (one step for every row, or
        `[batch]`, each row's own): padding, and inputs of earlier steps not marked visible
        downstream, once that gives back at least one block. Each row keeps its other slots in
        order (K/V keep their rotations: positions are not slots), and the capacity shrinks to
        fit. Slots left in place stay masked. `kept` (`[batch]` bool): rows that keep every
        slot they hold (a row whose step did not run: its previous step's last token, encoded
        with its next step, still reads what that step saw)."""
        kind = self.slots.kind
        # what the rule lets step `next_step` see (a later step sees no more of what is written
        # now); prompt slots are kept for whichever stage runs next
        written = TokenMeta(*(t[:, : self.length] for t in _fields(self.slots)))
        query = TokenMeta.fill(self.batch_size, 1, Kind.OUTPUT).to(kind.device)
        query.step[:, 0] = next_step
        seen = visibility(written.cat(query), 1)[:, 0, 0, : self.length]
        keep = torch.zeros_like(kind, dtype=torch.bool)
        keep[:, : self.length] = seen | (written.kind == Kind.PROMPT)
        if kept is not None:
            keep[:, : self.length] |= kept[:, None] & (written.kind != Kind.PAD)
        if _blocks(int(keep.sum(dim=1).max())) >= self.capacity:
            return  # no block to give back: a copy would cost time and free nothing
        self._compact(keep)

    def _compact(self, keep: torch.Tensor) -> None:
        """Keep the slots `keep` marks (`[batch, capacity]`), each row's first and in order,
        and drop the others; the length becomes the longest row's, the capacity shrinks to
        fit. K/V keep their rotations (positions are not slots)."""
        kind = self.slots.kind
        counts = keep.sum(dim=1)
        new_length = int(counts.max())
        # per row, the kept columns first, in order (a stable sort on "dropped")
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_length]
        filled = torch.arange(new_length, device=kind.device)[None] < counts[:, None]
        for tensors in (self.store.keys, self.store.values):
            for i, old in enumerate(tensors):
                index = order[:, None, :, None].expand(-1, old.shape[1], -1, old.shape[3])
                tensors[i] = _static(old.gather(2, index))
        gathered = [t.gather(1, order) for t in _fields(self.slots)]
        gathered[0] = torch.where(filled, gathered[0], torch.full_like(gathered[0], Kind.PAD))
        self.slots = TokenMeta(*gathered)
        self.length, self.capacity = new_length, new_length
        self._resize(new_length)

    def tokens_held(self) -> torch.Tensor:
        """Per row: the slots that hold a real token (prompt slots included, padding not)."""
        return (self.slots.kind[:, : self.length] != Kind.PAD).sum(dim=1)

    def content_held(self) -> torch.Tensor:
        """Per row: the slots that hold a content token (real, not a prompt slot)."""
        return (self.slots.kind[:, : self.length] > Kind.PROMPT).sum(dim=1)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K/V columns in use, every row (what a cache grown token by token
        would hold)."""
        return sum(t[:, :, : self.length].numel() * t.element_size()
                   for tensors in (self.store.keys, self.store.values) for t in tensors)

    @property
    def kv_bytes_allocated(self) -> int:
        """Bytes of the preallocated K/V tensors (in use or reserved)."""
        return sum(t.numel() * t.element_size()
                   for tensors in (self.store.keys, self.store.values) for t in tensors)
