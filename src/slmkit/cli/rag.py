"""``slmkit rag index`` and ``slmkit rag ask``: retrieval-augmented answers with sources and spans."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import FORCE_HELP, RegistryHelpCommand, console, kv_table, print_json, registry_names
from slmkit.cli.progress import quiet_libraries, with_progress

MODEL_HELP = "default | hub id | directory | file.gguf"


def register(app: typer.Typer) -> None:
    rag = typer.Typer(help="Retrieval-augmented generation: index documents, answer with sources.", no_args_is_help=True)
    rag.command("index", cls=RegistryHelpCommand)(with_progress("rag index")(rag_index))
    rag.command("ask", cls=RegistryHelpCommand)(rag_ask)
    app.add_typer(rag, name="rag")


def rag_index(
    docs: list[Path] = typer.Argument(..., help=".txt, .md, .jsonl files or directories"),
    output: Path = typer.Option(..., "--output", help="index directory (created, or extended incrementally)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    embedder: str = typer.Option("all-MiniLM-L6-v2", "--embedder", help="all-MiniLM-L6-v2 or a local encoder directory"),
    retriever: Optional[str] = typer.Option(None, "--retriever",
                                            help=registry_names("slmkit.rag.retrieve", "RETRIEVERS") + " (hybrid: "
                                                 "dense + BM25, reciprocal rank fusion); default: hybrid for a new "
                                                 "index, an existing index keeps its own"),
    max_words: int = typer.Option(200, "--max-words", min=8, help="words per chunk"),
    overlap: int = typer.Option(30, "--overlap", min=0, help="words shared by consecutive windows of a long paragraph"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Chunk, embed and index documents (resumes an interrupted run; adds only new or changed documents)."""
    from slmkit.progress import step
    from slmkit.rag.chunk import ChunkConfig
    from slmkit.rag.embed import Embedder
    from slmkit.rag.index import VectorIndex, build_index
    from slmkit.rag.retrieve import RetrieverConfig

    quiet_libraries()
    cfg = ChunkConfig(max_words=max_words, overlap_words=overlap)
    retr = RetrieverConfig(method=retriever) if retriever is not None else None
    t0 = time.perf_counter()
    stats = build_index(docs, output, Embedder.load(embedder), cfg, force=force, retriever=retr,
                        progress=lambda chunks, _docs: step("chunks embedded", chunks))
    result = {"index": str(output), **stats.__dict__, "retriever": VectorIndex.open(output).retriever.method,
              "seconds": round(time.perf_counter() - t0, 2)}
    if json_out:
        print_json(result)
    else:
        console.print(kv_table(f"rag index {output}", list(result.items())))


def _read_questions(path: Path, limit: int) -> list[str]:
    from slmkit.errors import DataError
    from slmkit.train.records import iter_rows

    qs = []
    for lineno, row in iter_rows(path, limit):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DataError(f"{path}:{lineno}: missing field 'question' (a non-empty string)", 'each line must be {"question": ...}')
        qs.append(row["question"])
    if not qs:
        raise DataError(f"{path} holds no questions")
    return qs


def rag_ask(
    index: Path = typer.Argument(..., help="an index built by `slmkit rag index`"),
    question: Optional[str] = typer.Argument(None, help="the question (or use --questions)"),
    questions: Optional[Path] = typer.Option(None, "--questions", help='jsonl of {"question": ...}'),
    model: str = typer.Option(..., "--model", help=MODEL_HELP + " | adapter dir (sft --rag) | http(s)://endpoint[#model]"),
    k: int = typer.Option(4, "--k", min=0, help="sources to retrieve (0: no retrieval, the baseline)"),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="the embedder to query with (default: the index's own; "
                                                                      "another one is refused)"),
    rerank: bool = typer.Option(False, "--rerank", help="rescore the retriever's top --rerank-depth with the model"),
    rerank_method: str = typer.Option("query-likelihood", "--rerank-method", help=registry_names("slmkit.rag.retrieve", "RERANKERS")),
    rerank_depth: int = typer.Option(12, "--rerank-depth", min=1),
    extractive: bool = typer.Option(False, "--extractive", help="answer with the source span the model scores highest"),
    extractive_method: str = typer.Option("score", "--extractive-method",
                                          help=registry_names("slmkit.rag.extract", "SPAN_METHODS") + ": rank candidate "
                                               "spans, or decode constrained to copy a source (suits an sft --rag adapter)"),
    min_span_score: float = typer.Option(-2.5, "--min-span-score",
                                         help="--extractive: mean log-prob/token below which the span is not trusted "
                                              "(then generate; abstain when that answer is in no source)"),
    filter_model: Optional[str] = typer.Option(None, "--filter", help="a small model that drops irrelevant passages first"),
    filter_threshold: float = typer.Option(0.0, "--filter-threshold", help="keep passages with log p(Yes) - log p(No) >= this"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    limit: int = typer.Option(0, "--limit", min=0, help="first N questions only (0 = all)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: bf16 on a GPU, fp32 on the CPU)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N (local models)"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="requests in flight at once to an http(s) --model"),
    json_out: bool = typer.Option(False, "--json", help="a list of {question, answer, sources: [{id, text, score}], span: {id, start, end}}"),
) -> None:
    """Answer questions with retrieved, numbered sources, and cite them (or extract the answer span)."""
    from slmkit.backends import check_concurrency, from_spec
    from slmkit.collab.retrieval import FilterConfig
    from slmkit.errors import ConfigError
    from slmkit.rag.answer import RAGConfig, answer
    from slmkit.rag.embed import Embedder
    from slmkit.rag.extract import ExtractConfig
    from slmkit.rag.index import VectorIndex
    from slmkit.rag.retrieve import RerankConfig

    from slmkit.models.device import resolve_device, resolve_dtype

    quiet_libraries()
    check_concurrency(concurrency, model)
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    if (question is None) == (questions is None):
        raise ConfigError("give either a QUESTION or --questions FILE.jsonl")
    if extractive_method != "score" and not extractive:
        raise ConfigError(f"--extractive-method {extractive_method} needs --extractive")
    qs = _read_questions(questions, limit) if questions is not None else [question]
    cfg = RAGConfig(k=k, max_new_tokens=max_new_tokens,
                    rerank=RerankConfig(method=rerank_method, depth=rerank_depth) if rerank else None,
                    extractive=ExtractConfig(method=extractive_method, min_score=min_span_score) if extractive else None,
                    filter=FilterConfig(threshold=filter_threshold) if filter_model else None)
    idx = VectorIndex.open(index)  # also checks INDEX with --k 0, so a typo fails early
    emb = None
    if k > 0 and (idx.retriever.needs_embedder or embedder is not None):
        emb = Embedder.load(embedder or idx.embedder_identity["spec"])
        idx.check_embedder(emb)
    small = from_spec(filter_model, dtype=dtype, device=dev) if filter_model else None
    answers = answer(from_spec(model, dtype=dtype, concurrency=concurrency, device=dev), idx if k > 0 else None, emb, qs, cfg,
                     batch_size=max(8, 4 * concurrency), small=small)
    if json_out:
        print_json([a.to_dict() for a in answers])
        return
    for a in answers:
        console.print(f"[bold]Q:[/bold] {a.question}")
        console.print(f"[bold]A:[/bold] {a.answer if a.answer is not None else '(abstained) ' + (a.reason or '')}")
        for i, h in enumerate(a.sources, 1):
            mark = "*" if h.id in a.cited or (a.span and a.span["id"] == h.id) else " "
            console.print(f"  {mark}[{i}] {h.id} ({h.score:.3f}): {h.text[:100]}")
