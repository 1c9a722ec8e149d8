"""Runs PagedModel on planned steps: owns the paged KV pool and the per-slot device state, launches each step
without waiting for it, and reads its sampled ids back when the engine asks (one step later).

KV pool: engine.worker.kv_cache (one tensor for every layer's k and v; sized from free memory unless given).

Per-slot state (rows are engine.core.slots' slots): `block_tables` int32 [max_num_seqs + 1, max_blocks_per_seq], whose
extra last row absorbs the padding entries of a step's block-table update, and the SlotSampler's tensors (the
next input ids `last_token`, sampling settings, seen-token masks). Rows move with their sequences (plan.slot_moves)
and are copied where beams reorder.

Before a step's forward, in stream order, its bookkeeping (one small upload, only when there is any): slot-row moves
and copies, copy-on-write KV block copies.

A decode step: the pending slot moves; one upload of the rows' positions and the block-table entries they gained;
then the block-table scatter, PagedModel.decode on last_token[:B] and block_tables[:B], and the sampler writing
last_token[:B] (on CUDA one graph replay, captured per batch size B and sampler mode); then the read-back
copy. Nothing in it waits for the host. When a row's request wants logprobs, they are computed after the sampler
(outside the graph, from the logits it left in its static output buffer `decode_logits`) and ride the same
read-back; a step with no such row launches exactly what it did without the feature.

A step with structured outputs' grammar masks (plan.grammar_masks) uploads them with its inputs and runs eagerly (a
decode step too: the graphs hold the unmasked sampler); the sampler unpacks them on the device and masks the rows'
logits once (engine.sample.ops.allowed_tokens).

A mixed step (prompt chunks, draft checks, decode rows: engine.worker.varlen) runs eagerly. When a chunk scores prompt
positions (prompt logprobs) it runs the layers (`PagedModel.prefill_hidden`), the LM head on the rows that sample,
and the LM head on the scored positions in chunks (engine.sample.logprobs.prompt_logprobs); else `PagedModel.prefill`,
which computes logits at the sampling rows only. Fork children started by their parent's last chunk sample from the
parent's last-token row.

Shapes (the triton op set): every launch has one of finitely many shapes (engine.worker.shape_buckets), and
`warm_up` runs them all. The torch op set compiles nothing and pads nothing.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hayabusa.engine.core.block_manager import PagedPrompt, PagedSequence
from hayabusa.engine.core.step_plan import StepPlan
from hayabusa.engine.model.paged_model import DecodeInputs, PagedModel, PrefillInputs
from hayabusa.engine.sample.grammars import mask_words
from hayabusa.engine.sample.logprobs import PROMPT_CHUNK_ROWS, StepLogprobs, prompt_logprobs, token_logprobs
from hayabusa.engine.sample.ops import allowed_tokens
from hayabusa.engine.sample.sampler import SamplerMode, SlotSampler
from hayabusa.engine.worker.kv_cache import blocks_that_fit, kv_pool
from hayabusa.engine.worker.shape_buckets import graph_batch_sizes, prefill_bucket, prefill_buckets
from hayabusa.engine.worker.staging import Field, Layout, PackedUpload, Readback, ResultRing
from hayabusa.engine.worker.varlen import (
    VarlenBatch,
    draft_width,
    fill_varlen,
    pass_fields,
    scored_fields,
    varlen_fields,
)
from hayabusa.kernels._launch import engine_tickets, ticket_capacity


@dataclass
class InFlight:
    """A launched step whose sampled ids have not been read yet."""

    plan: StepPlan
    readback: Readback
    # A step with draft checks: (emitted ids [P, K + 1], their counts [P]) on the device, and each check's row.
    passes: tuple[Tensor, Tensor, list[int]] | None = None
    beam_logits: list[Tensor] = field(default_factory=list)  # a step with beams: per group of plan.beams (device)


@dataclass
class StepResult:
    """What one step produced, read back to the host: the worker's answer to a StepPlan."""

    token_ids: list  # the sampled id per row; with draft checks, each row's emitted ids
    bad_rows: frozenset[int]  # rows whose logits were not finite (NaN or inf): their requests fail alone
    logprobs: StepLogprobs | None  # when the plan wanted any
    # A step with beams: per group of plan.beams, its rows' logits [rows, vocab] on the device (the search scores them).
    beam_logits: list[Tensor] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: PagedModel, *, block_size: int, num_kv_blocks: int | None, max_num_seqs: int,
                 max_num_batched_tokens: int, gpu_memory_utilization: float = 0.9,
                 use_cuda_graphs: bool = True) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if num_kv_blocks is not None and (not isinstance(num_kv_blocks, int) or num_kv_blocks < 1):
            raise ValueError(f"kv_cache_blocks must be a positive integer or None, got {num_kv_blocks!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        self.model = model
        self.config = config = model.config
        self.device = model.device
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-config.max_position_embeddings // block_size)
        self.max_prefill_tokens = min(max_num_batched_tokens, max_num_seqs * config.max_position_embeddings)
        self.bucketed = model.ops.name == "triton"  # compiled kernels: pad to finitely many shapes
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        if num_kv_blocks is None:
            num_kv_blocks = blocks_that_fit(config, model.dtype, self.device, block_size=block_size,
                                            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                            gpu_memory_utilization=gpu_memory_utilization)
        self.num_kv_blocks = num_kv_blocks
        self.kv_pool = kv_pool(config, num_kv_blocks, block_size, model.dtype, self.device)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_pool]  # contiguous views

        self.block_tables = torch.zeros(max_num_seqs + 1, self.max_blocks_per_seq, dtype=torch.int32,
                                        device=self.device)
        self._trash_entry = max_num_seqs * self.max_blocks_per_seq  # flat index into the extra last row
        self.sampler = SlotSampler(max_num_seqs, config.vocab_size, model.dtype, self.device,
                                   max_model_len=config.max_position_embeddings, eos_token_id=config.eos_token_id)
        # Where every decode step (eager or graph) writes its logits, so that logprobs can read them after a replay.
        self.decode_logits = torch.empty(max_num_seqs, config.vocab_size, dtype=model.dtype, device=self.device)
        self._per_slot = [self.block_tables] + self.sampler.per_slot_tensors()
        self.mask_words = mask_words(config.vocab_size)  # int32 words per row of a grammar mask
        self.uploads = PackedUpload(max(PackedUpload.nbytes(self._decode_fields(max_num_seqs, masked=True)),
                                        self._largest_varlen_upload()), self.device)
        self.bookkeeping_uploads = PackedUpload(PackedUpload.nbytes(self._bookkeeping_fields(*(max_num_seqs,) * 2)),
                                                self.device)
        self.results = ResultRing(max_num_seqs, model.dtype, self.sampler.row_max_bits_dtype, self.device)
        self._decode_layouts: dict[tuple[int, bool], Layout] = {}  # (batch, masked) -> layout
        # The torch op set reads indices back to the host (a sync no graph capture allows); it runs eagerly.
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda" and self.bucketed
        # The split reductions' counters, this runner's own and never reallocated: captured graphs point at them.
        self.tickets = torch.zeros(ticket_capacity(max(3 * config.hidden_size, config.intermediate_size,
                                                       config.vocab_size), max_num_seqs, config.num_attention_heads),
                                   dtype=torch.int32, device=self.device)
        self.graphs: dict[tuple[int, SamplerMode], torch.cuda.CUDAGraph] = {}  # (batch size, sampler mode) -> graph

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """Where the runner's launches go: its device (a thread's current CUDA device is its own) and its ticket
        counters (kernels/_launch.py engine_tickets)."""
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with device, engine_tickets(self.tickets):
            yield

    # ---- shapes ----------------------------------------------------------------------------------------------

    def decode_batch_size(self, num_rows: int) -> int:
        """The batch a step of num_rows rows runs at: the smallest graph size that holds them (bucketed)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_rows)] if self.bucketed else num_rows

    def _padded_logit_rows(self, num_rows: int) -> int:
        """The rows an LM head of num_rows runs at: a graph batch size, or past the largest (draft checks) a
        prefill bucket."""
        return self.decode_batch_size(num_rows) if num_rows <= self.max_num_seqs else self._padded_tokens(num_rows)

    def _padded_tokens(self, num_tokens: int) -> int:
        return prefill_bucket(num_tokens) if self.bucketed else num_tokens

    def _decode_fields(self, batch: int, masked: bool = False) -> list[Field]:
        fields = [("positions", torch.int32, (batch,)), ("table_block", torch.int32, (batch,)),
                  ("table_index", torch.int64, (batch,))]
        return fields + self._mask_fields(batch) if masked else fields

    def _mask_fields(self, num_rows: int) -> list[Field]:
        """Structured outputs' grammar masks of num_rows rows (StepPlan.grammar_masks)."""
        return [("grammar_masks", torch.int32, (num_rows, self.mask_words))]

    def _table_fields(self, num_entries: int) -> list[Field]:
        """Block-table entries a step adds: flat index slot * max_blocks_per_seq + column, and the block id."""
        return [("table_index", torch.int64, (num_entries,)), ("table_block", torch.int32, (num_entries,))]

    def _largest_varlen_upload(self) -> int:
        """Bytes of the largest varlen step: max_prefill_tokens over max_num_seqs rows, every block-table entry of
        every slot, and the sampler settings of max_num_seqs admitted rows with all their tokens seen."""
        rows, length = self.max_num_seqs, self.config.max_position_embeddings
        largest = VarlenBatch(np.arange(rows), np.zeros(rows, np.int64), np.ones(rows, np.int64), {},
                              np.ones(rows, np.int64))
        fields = varlen_fields(largest, self._padded_tokens(self.max_prefill_tokens), self.decode_batch_size(rows))
        fields += self._table_fields(rows * (self.max_blocks_per_seq + 1))
        fields += pass_fields(self.max_prefill_tokens, rows, self.max_prefill_tokens)
        fields += scored_fields(self.max_prefill_tokens) + self._mask_fields(rows)
        return PackedUpload.nbytes(fields + self.sampler.settings_fields(rows, rows * length))

    @staticmethod
    def _bookkeeping_fields(num_moves: int, num_copies: int) -> list[Field]:
        """Slot-row moves and block copies."""
        return [("moves", torch.int64, (2, num_moves)), ("block_copies", torch.int64, (2, num_copies))]

    def _decode_layout(self, batch: int, masked: bool = False) -> Layout:
        layout = self._decode_layouts.get((batch, masked))
        if layout is None:
            layout = self._decode_layouts[batch, masked] = self.uploads.layout(self._decode_fields(batch, masked))
        return layout

    # ---- launching -------------------------------------------------------------------------------------------

    def launch(self, plan: StepPlan) -> InFlight:
        """Start one planned step on the device; its sampled ids are read with `collect`."""
        # Steps may run on any caller's thread, and a thread's current CUDA device is its own.
        with self.on_device():
            self._apply_bookkeeping(plan)
            if plan.is_mixed:
                return self._launch_mixed(plan)
            return InFlight(plan, self._launch_decode(plan))

    def collect(self, step: InFlight) -> StepResult:
        """The step's results on the host; waits for the step if it is still running."""
        readback = step.readback
        ResultRing.wait(readback)
        bad_rows = self.sampler.nonfinite_rows(readback.row_max_bits)
        if step.passes is None:
            return StepResult(readback.ids.tolist(), bad_rows, readback.logprobs, step.beam_logits)
        emitted, counts, pass_rows = step.passes
        row_tokens: list[list[int]] = [[] for _ in range(step.plan.num_rows)]
        for row, tokens, count in zip(pass_rows, emitted.tolist(), counts.tolist(), strict=True):
            row_tokens[row] = tokens[:count]
        return StepResult(row_tokens, bad_rows, readback.logprobs, step.beam_logits)

    def _apply_bookkeeping(self, plan: StepPlan) -> None:
        """Before the step: copy moved sequences' rows of every per-slot tensor (all sources read before any row is
        written), copy shared KV blocks before their writes."""
        (destinations, sources), copies = plan.slot_moves, plan.block_copies
        if not (destinations or copies):
            return
        layout = self.bookkeeping_uploads.layout(self._bookkeeping_fields(len(destinations), len(copies)))
        host = self.bookkeeping_uploads.host_views(layout)
        host["moves"][:] = (destinations, sources)
        if copies:
            host["block_copies"][:] = np.asarray(copies).T
        views = self.bookkeeping_uploads.upload(layout)  # async: a blocking copy would wait for the device
        if destinations:
            rows = views["moves"]
            for tensor in self._per_slot:
                tensor.index_copy_(0, rows[0], tensor.index_select(0, rows[1]))
        if copies:
            blocks = views["block_copies"]  # [2, copies]: sources, destinations
            self.kv_pool.index_copy_(2, blocks[1], self.kv_pool.index_select(2, blocks[0]))

    def _launch_decode(self, plan: StepPlan) -> Readback:
        rows, masks = plan.num_rows, plan.grammar_masks
        batch = self.decode_batch_size(rows)
        layout = self._decode_layout(batch, masked=masks is not None)
        host = self.uploads.host_views(layout)
        positions, table_index, table_block = host["positions"], host["table_index"], host["table_block"]
        positions[:rows] = plan.positions
        positions[rows:] = -1  # padding rows: nothing written, output ignored
        width = self.max_blocks_per_seq
        for i, (slot, column, block_id) in enumerate(plan.new_blocks):
            table_index[i] = slot * width + column
            table_block[i] = block_id
        table_index[len(plan.new_blocks):] = self._trash_entry
        if masks is not None:
            host["grammar_masks"][:rows] = masks
            host["grammar_masks"][rows:] = -1
        views = self.uploads.upload(layout)
        graph = self.graphs.get((batch, plan.sampler_mode)) if masks is None else None
        if graph is not None:
            graph.replay()
        else:
            self._decode_body(batch, plan.sampler_mode, views)
        sampled = token_logprobs(self.decode_logits[:rows], self.sampler.last_token[:rows]) \
            if plan.wants_logprobs else None
        return self.results.copy_out(self.sampler.last_token, self.sampler.row_max, slice(0, rows), sampled)

    def _decode_body(self, batch: int, mode: SamplerMode, views: dict[str, Tensor]) -> None:
        """What a decode graph holds: reads and writes only static device buffers (its logits: decode_logits)."""
        self.block_tables.view(-1).index_copy_(0, views["table_index"], views["table_block"])
        inputs = DecodeInputs(input_ids=self.sampler.last_token[:batch], positions=views["positions"],
                              block_tables=self.block_tables[:batch], check_indices=False)
        logits = self.model.decode(inputs, self.kv_caches, logits_out=self.decode_logits[:batch])  # [batch, vocab]
        self.sampler.sample(logits, slice(0, batch), mode, views["positions"], self._allowed(views))

    def _allowed(self, views: dict[str, Tensor]) -> Tensor | None:
        """bool [rows, vocab]: what the uploaded grammar masks allow (None when the step has none)."""
        masks = views.get("grammar_masks")
        return allowed_tokens(masks, self.config.vocab_size) if masks is not None else None

    def _launch_mixed(self, plan: StepPlan) -> InFlight:
        """One varlen forward over every row that computes tokens: decode rows (input from last_token), prompt
        chunks and draft checks (input from the host); then the rows that reached the end of their prompt (and the
        fork children they start), the decode rows and every position of a draft check sample. Runs eagerly (its
        shapes vary); decode-only steps keep their graphs."""
        rows = np.flatnonzero(plan.num_new_tokens)
        counts = plan.num_new_tokens[rows]
        index_of = {row: i for i, row in enumerate(rows.tolist())}
        host_tokens = {index_of[row]: plan.seqs[row].token_ids[plan.positions[row]:plan.positions[row] + counts[i]]
                       for row, i in ((row, index_of[row]) for row in plan.chunks)}
        drafts = {index_of[row]: draft for row, draft in plan.drafts.items()}
        for row, draft in plan.drafts.items():
            host_tokens[index_of[row]] = [plan.seqs[row].token_ids[-1], *draft]
        for group, group_rows in plan.beams:  # a started group's beams: the tokens its search appended
            if group.started:
                host_tokens.update((index_of[row], plan.seqs[row].token_ids[-1:]) for row in group_rows)
        logit_counts = np.minimum(plan.tokens_per_row[rows], 1)
        for i, draft in drafts.items():
            logit_counts[i] = len(draft) + 1
        forks = [(index_of[parent], child) for child, parent in plan.forked_from.items() if plan.tokens_per_row[child]]
        scored = [(index_of[row], first, end, plan.seqs[row].token_ids[first + 1:end + 1])
                  for row, (first, end) in plan.scored.items() if end > first]
        batch = VarlenBatch(rows, plan.positions[rows], counts, host_tokens, logit_counts, drafts, forks, scored)
        admitted = [plan.seqs[row] for row in plan.admitted]
        inputs, views = self._pack_varlen(batch, plan.new_blocks, plan.admitted, admitted, plan.grammar_masks)
        allowed = self._allowed(views)  # [rows, vocab] by slot
        if admitted:
            self.sampler.load(views)
            self.sampler.load_processors(plan.admitted, admitted)
        num_logits = batch.num_logits
        prompt = None
        if scored:
            hidden = self.model.prefill_hidden(inputs, self.kv_caches)  # [T, hidden]
            logits = self.model.lm_head(hidden[inputs.last_token_rows])[:num_logits]  # [logit rows, vocab]
            # The LM head runs at the padded row counts only (the shapes warm-up compiled), as in any step.
            prompt = prompt_logprobs(self.model.lm_head, hidden, views["scored_rows"], views["scored_targets"],
                                     self._padded_logit_rows, min(PROMPT_CHUNK_ROWS, self.max_num_seqs))
        else:
            logits = self.model.prefill(inputs, self.kv_caches)[:num_logits]  # [logit rows, vocab]
        passes = sampled = None
        if drafts:
            num_passes = views["pass_slots"].shape[0]
            pass_drafts = torch.full((num_passes * draft_width(batch),), -1, dtype=torch.int64, device=self.device)
            pass_drafts.index_copy_(0, views["draft_index"], views["draft_tokens"])
            emitted, emitted_counts = self.sampler.sample_positions(
                logits, views["position_pass"], views["position_offset"], views["pass_slots"],
                pass_drafts.view(num_passes, -1), plan.sampler_mode, allowed)
            pass_rows = rows[np.flatnonzero(logit_counts)].tolist() + [child for _, child in forks]
            passes = (emitted, emitted_counts, pass_rows)
            # Rows that ask for logprobs never speculate: their pass is one position, emitting one token.
            asked = [p for p, row in enumerate(pass_rows) if plan.seqs[row].params.wants_token_logprobs] \
                if plan.wants_logprobs else []
            if asked:
                pass_sizes = np.concatenate([logit_counts[logit_counts > 0], np.ones(len(forks), dtype=np.int64)])
                first_logit = np.cumsum(pass_sizes) - pass_sizes  # [passes]: each pass's first logit row
                sampled = token_logprobs(logits[torch.as_tensor(first_logit[asked], device=self.device)],
                                         emitted[torch.as_tensor(asked, device=self.device), 0]).scatter(
                    torch.as_tensor([pass_rows[p] for p in asked], device=self.device), plan.num_rows)
        elif num_logits:  # else only prompt chunks short of their end: their KV is all this step makes
            self.sampler.sample(logits, views["logit_slots"], plan.sampler_mode, allowed=allowed)
            if plan.wants_logprobs:  # by slot row, as in a decode step
                sampled = token_logprobs(logits, self.sampler.last_token[views["logit_slots"]]).scatter(
                    views["logit_slots"], plan.num_rows)
        readback = self.results.copy_out(self.sampler.last_token, self.sampler.row_max, slice(0, plan.num_rows),
                                         sampled, prompt)
        beam_logits = []
        if plan.beams:  # logit row of a row with one logit: the count of logit rows up to and including it, - 1
            logit_row = np.cumsum(logit_counts) - 1
            beam_logits = [logits[torch.as_tensor(logit_row[[index_of[row] for row in group_rows]],
                                                  device=self.device)] for _, group_rows in plan.beams]
        return InFlight(plan, readback, passes, beam_logits)

    def prepare_prefill(self, seqs: list[PagedSequence], first_slot: int = 0) -> PrefillInputs:
        """Pack every sequence's tokens past its prefix-cache hit into slots first_slot...; the cached prefix is
        read from the pool. seqs need block tables from this pool's BlockManager (`hayabusa verify` packs its
        prompts here, into idle slots). Rows past the real tokens pad a bucket (see the module docstring)."""
        slots = np.arange(first_slot, first_slot + len(seqs))
        batch = VarlenBatch(slots, np.array([seq.num_cached_tokens for seq in seqs], dtype=np.int64),
                            np.array([len(seq.token_ids) - seq.num_cached_tokens for seq in seqs], dtype=np.int64),
                            {i: seq.token_ids[seq.num_cached_tokens:] for i, seq in enumerate(seqs)},
                            np.ones(len(seqs), dtype=np.int64))
        entries = [(slot, column, block_id) for slot, seq in zip(slots.tolist(), seqs, strict=True)
                   for column, block_id in enumerate(seq.block_table)]
        return self._pack_varlen(batch, entries, [], [])[0]

    def _pack_varlen(self, batch: VarlenBatch, table_entries: list[tuple[int, int, int]], loaded_slots: list[int],
                     loaded: list, grammar_masks: np.ndarray | None = None) -> tuple[PrefillInputs, dict[str, Tensor]]:
        """Upload a varlen batch with the block-table entries it adds, the sampler settings of the sequences it
        loads and the grammar masks of its rows, in one copy; scatter the entries and bring in the decode rows' input
        ids (both on the device)."""
        num_tokens = batch.num_tokens
        fields = varlen_fields(batch, self._padded_tokens(num_tokens),
                               self._padded_logit_rows(max(batch.num_logits, 1)))
        fields += self._table_fields(len(table_entries))
        fields += self.sampler.settings_fields(len(loaded), self.sampler.num_seen_tokens(loaded))
        if batch.scored:
            fields += scored_fields(sum(len(targets) for *_, targets in batch.scored))
        if grammar_masks is not None:
            fields += self._mask_fields(len(grammar_masks))
        layout = self.uploads.layout(fields)
        host = self.uploads.host_views(layout)
        fill_varlen(host, batch)
        if grammar_masks is not None:
            host["grammar_masks"][...] = grammar_masks
        if table_entries:
            slots, columns, block_ids = np.array(table_entries, dtype=np.int64).T
            host["table_index"][:] = slots * self.max_blocks_per_seq + columns
            host["table_block"][:] = block_ids
        self.sampler.fill_settings(host, loaded_slots, loaded)
        views = self.uploads.upload(layout)
        self.block_tables.view(-1).index_copy_(0, views["table_index"], views["table_block"])
        views["input_ids"].index_copy_(0, views["device_token_rows"],
                                       self.sampler.last_token.index_select(0, views["device_slots"]))
        inputs = PrefillInputs(input_ids=views["input_ids"], positions=views["positions"],
                               cu_seqlens=views["cu_seqlens"], context_lens=views["context_lens"],
                               block_tables=self.block_tables.index_select(0, views["slots"]),
                               last_token_rows=views["last_token_rows"], max_seqlen_q=int(batch.counts.max()),
                               check_indices=False, num_padding_rows=views["input_ids"].shape[0] - num_tokens)
        return inputs, views

    def close(self) -> None:
        """Release the KV pool and the graphs; the runner cannot be used afterwards."""
        self.graphs.clear()
        self.kv_caches.clear()
        self.kv_pool = None

    # ---- warm-up ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def warm_up(self, *, prefill: bool, progress: bool = True) -> None:
        """Run every decode batch size (capturing a graph per sampler mode on CUDA) and, with prefill, every
        prefill bucket, so that no request waits for a kernel compile. Only while no request runs: it writes
        through idle slots and KV blocks."""
        shapes = [("decode", batch) for batch in reversed(self.batch_sizes)]  # largest first: graphs share its pool
        if prefill:
            shapes += [("prefill", tokens) for tokens in prefill_buckets(self.max_prefill_tokens)]
        pool = None
        with self.on_device():
            for kind, size in tqdm(shapes, desc="hayabusa warm-up", unit="shape", disable=not progress):
                if kind == "decode":
                    pool = self._warm_decode(size, pool)
                else:
                    self._warm_prefill(min(size, self.max_prefill_tokens))
                if self.device.type == "cuda":  # the upload ring is reused only after its copy has run
                    torch.cuda.synchronize(self.device)

    def _warm_decode(self, batch: int, pool: tuple | None) -> tuple | None:
        layout = self._decode_layout(batch)
        host = self.uploads.host_views(layout)
        host["positions"][:] = -1  # every row padding: no cache writes
        host["table_index"][:] = self._trash_entry
        views = self.uploads.upload(layout)
        for mode in SamplerMode:
            self._decode_body(batch, mode, views)  # compiles outside any capture
            if self.use_cuda_graphs:
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_body(batch, mode, views)
                pool = graph.pool() if pool is None else pool
                self.graphs[(batch, mode)] = graph
        return pool

    def _warm_prefill(self, num_tokens: int) -> None:
        max_len, width = self.config.max_position_embeddings, self.max_blocks_per_seq
        lengths = [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])
        prompts = [PagedPrompt([0] * length, [(i * width + j) % self.num_kv_blocks
                                              for j in range(-(-length // self.block_size))])
                   for i, length in enumerate(lengths)]
        self.model.prefill(self.prepare_prefill(prompts), self.kv_caches)
