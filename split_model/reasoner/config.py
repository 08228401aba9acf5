"""Configuration of the small recurrent reasoner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeedbackMode = Literal["none", "last", "all"]
RetrievalQuery = Literal["layer", "previous"]


@dataclass
class ReasonerConfig:
    """Shape of the reasoner. Sizes that follow from the memory (vocabulary, memory width)
    are read from the backbone in code, never written here.

    Args:
        d_model: width of the residual stream.
        n_layers: number of blocks, each self-attention -> cross-attention -> MLP.
        n_heads: attention heads (d_model must divide evenly).
        mlp_ratio: MLP hidden width as a multiple of d_model.
        feedback: what flows from step t into step t+1 besides the token: none (a plain
            decoder), last (the last layer's output), all (a learned mix of every layer).
        feedback_tokens: with feedback last or all, step t+1 also takes in the input
            embedding that step t's own output distribution expects, sum_i p_i E_i (as a
            sampled token would be fed in, but soft and differentiable), through its own
            zero-initialised d x d gate. Where a step is trained to name a set of tokens, this
            hands the next step that set as a clean superposition of their embeddings, which
            the layer states carry only mixed with everything else. Cost per step: the
            output head once more (over the output vocabulary when one is set).
        embed_rank: rank of the factorised token embedding shared by input and output; keeps
            a large backbone vocabulary cheap.
        rope_base: base of the rotary position embedding of self-attention.
        halting: a learned halting head: generation stops a row's latent steps once the
            head's halt probability passes `halt_threshold` (after at least one latent step,
            never beyond the row's latent count, which becomes a maximum). The head starts at
            "continue" (probability about 0.05), so a fresh model thinks for the full count.
        halt_threshold: the halt probability at which a row stops thinking.
        retrieval_k: chunks fetched from a retrieval store at each querying step (0: no
            retrieval). The store itself is the training module's `store`; see reasoner/retrieval.py.
        retrieval_every: query at steps 0, n, 2n, ... (1: every step).
        retrieval_layer: the query is the output of this many blocks (0: the step's input), and
            the fetched chunks join the cross-attention of blocks retrieval_layer and above.
        retrieval_query: where a step's query comes from. layer: the output of
            `retrieval_layer` blocks of the same step (what step t-1 fetched reaches step t's
            query only through the feedback). previous: the previous step's final hidden
            state, which has read what that step fetched (hop h+1's query is one projection
            of hop h's result; step 0, having no previous step, uses the layer rule).
        retrieval_quote: with retrieval_query previous, the next step's query also quotes what
            this step fetched: an attention from the step's normed final hidden over the
            fetched tokens' memory states (every layer the store holds), mapped into the
            key space by a zero-initialised projection. A name read in a fetched chunk then
            reaches the next query in the memory's own space, not squeezed through the
            reasoner's width; at initialisation the query is exactly the one without quoting.
        retrieval_quote_question: the query a step forms from its own layer (step 0 with
            retrieval_query previous; every querying step with layer) also quotes the
            question: an attention from that layer's state over the question's memory states
            (every layer the memory reads), mapped into the key space by a zero-initialised
            projection. The first hop's query then carries the asked name as the memory
            holds it, as later hops' quotes carry the names they read; at initialisation the
            query is exactly the one without it. With retrieval_rerank and the module's
            retrieval_pick_loss, on in configs/world.yaml (README, "The first query quoting the
            question").
        retrieval_rerank: the fetched chunks' log-probabilities (the attention bias, the
            quote's preference) also score each chunk's best-matching token: the query mapped
            by a zero-initialised projection onto the tokens' memory states (every stored
            layer), max over the chunk's tokens, added to query . key. A mean-pooled key
            blurs a name among its sentence's words; one token can match it exactly (with the
            embeddings stored, by word and position). Search itself is unchanged: this ranks
            the k chunks it fetched. The projection reads the query detached (the query learns
            from the keys alone). With the training module's `retrieval_pick_loss`, on the
            knowledge worlds, the third and fourth hops' facts were found far more often and
            the second hop's answers less often (README, "Reranking the fetched chunks"); with
            retrieval_quote_question too, better at 2 and 3 hops (on in configs/world.yaml).
        retrieval_match_question: where a step's query is formed from its layer (step 0 with
            retrieval_query previous; every querying step with layer), the fetched chunks'
            log-probabilities also count how well their tokens match the question's: an
            attention from that layer's state weighs the question's tokens, and each token
            adds its weight times its best cosine similarity (per stored layer, averaged) with
            any token of the chunk, times a zero-initialised scale. A mean-pooled key blurs a
            name among its sentence's words, and one probe vector matches one token; this
            matches the asked name piece by piece ("Sel" and "##in" of "Selin" both present,
            against "Sel" and "##im"), with the embeddings stored, word for word. Needs the
            memory to read the layers the store holds. At initialisation the ranking is the
            one without it. With retrieval_match_quote, the best knowledge-world runs so far
            (README, "Matching the asked name token by token").
        retrieval_match_quote: the same for a query the previous step proposed (retrieval_quote):
            the 4 fetched tokens its quote weighed most (the name it read), with their weights,
            travel with the proposal and take the question's place. Its own zero-initialised
            scale.
        memory_window: each memory token also takes in the states of the memory_window
            tokens on either side: a second projection of the backbone states mixed along the
            tokens by a depthwise convolution (zero-initialised), added to the adapted state
            (0: none). It puts the other end of a short fact at each of its tokens ("Tom" at
            "terpus" in "Tom is a terpus."), which a frozen layer holds poorly. Cost: once per
            context, one projection and a convolution.
        memory_layers: trainable bidirectional self-attention layers (each with an MLP) run
            over the projected memory once per context, before the blocks read it (0: the
            blocks read the backbone's states as projected). They let a memory token take in
            what its neighbours say (whose class "terpus" is in "Tom is a terpus.") where the
            frozen layer does not carry it; retrieved chunks pass through them too, each on
            its own. Each layer starts as the identity (zero-initialised outputs). Cost: once
            per context, in parallel over its tokens, never per reasoning step.
    """

    d_model: int = 256  # residual width
    n_layers: int = 4  # blocks per step
    n_heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * d_model
    feedback: FeedbackMode = "all"  # what of step t reaches step t+1
    feedback_tokens: bool = False  # also feed back the expected embedding of step t's output distribution
    embed_rank: int = 64  # factorised (V, r) x (r, d) embedding, tied with the output head
    rope_base: float = 10000.0  # rotary base for self-attention positions
    halting: bool = False  # learned halting of latent steps
    halt_threshold: float = 0.5
    retrieval_k: int = 0  # chunks per query; 0 turns retrieval off
    retrieval_every: int = 1  # steps between queries
    retrieval_layer: int = 1  # query after this many blocks; chunks join the blocks from here up
    retrieval_query: RetrievalQuery = "layer"  # the query's source: this step's layer, or the previous step's output
    retrieval_quote: bool = False  # previous: the next query also quotes the fetched chunks' memory states
    retrieval_quote_question: bool = False  # a query formed from the layer also quotes the question's memory states
    retrieval_rerank: bool = False  # the fetched chunks are also scored by their best-matching token
    retrieval_match_question: bool = False  # ... and, at a layer-formed query, by the question's tokens they match
    retrieval_match_quote: bool = False  # ... and, at a proposed query, by the tokens its quote read most
    memory_window: int = 0  # tokens either side that each memory token takes in (a convolution)
    memory_layers: int = 0  # trainable self-attention layers over the memory, once per context

    def __post_init__(self):
        if self.d_model <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.embed_rank <= 0:
            raise ValueError(
                f"reasoner sizes must be positive: d_model={self.d_model}, n_layers={self.n_layers}, "
                f"n_heads={self.n_heads}, embed_rank={self.embed_rank}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head width d_model/n_heads={self.d_model // self.n_heads} must be even for rotary")
        if self.feedback not in ("none", "last", "all"):
            raise ValueError(f"feedback must be one of none, last, all; got {self.feedback!r}")
        if self.feedback_tokens and self.feedback == "none":
            raise ValueError("feedback_tokens feeds step t's output distribution into step t+1: it needs "
                             "feedback last or all, got none")
        if not 0.0 < self.halt_threshold < 1.0:
            raise ValueError(f"halt_threshold must be strictly between 0 and 1, got {self.halt_threshold}")
        if self.retrieval_k < 0 or self.retrieval_every < 1:
            raise ValueError(f"retrieval_k must be >= 0 and retrieval_every >= 1, got {self.retrieval_k}, "
                             f"{self.retrieval_every}")
        if self.retrieval_k and not 0 <= self.retrieval_layer < self.n_layers:
            raise ValueError(f"retrieval_layer={self.retrieval_layer} must be in 0..n_layers-1={self.n_layers - 1}: "
                             "the fetched chunks join the blocks from that one up")
        if self.retrieval_query not in ("layer", "previous"):
            raise ValueError(f"retrieval_query must be layer or previous, got {self.retrieval_query!r}")
        if self.retrieval_quote and not (self.retrieval_k and self.retrieval_query == "previous"):
            raise ValueError("retrieval_quote quotes fetched chunks into the next step's query: it needs "
                             f"retrieval_k > 0 and retrieval_query: previous (got retrieval_k={self.retrieval_k}, "
                             f"retrieval_query={self.retrieval_query!r})")
        if self.retrieval_quote_question and not self.retrieval_k:
            raise ValueError("retrieval_quote_question quotes the question into the query: it needs retrieval_k > 0")
        if self.retrieval_rerank and not self.retrieval_k:
            raise ValueError("retrieval_rerank ranks the fetched chunks: it needs retrieval_k > 0")
        if self.retrieval_match_question and not self.retrieval_k:
            raise ValueError("retrieval_match_question ranks the fetched chunks: it needs retrieval_k > 0")
        if self.retrieval_match_quote and not self.retrieval_quote:
            raise ValueError("retrieval_match_quote matches the tokens a quote read: it needs retrieval_quote")
        if self.memory_layers < 0 or self.memory_window < 0:
            raise ValueError(f"memory_layers and memory_window must be >= 0, got {self.memory_layers}, "
                             f"{self.memory_window}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
