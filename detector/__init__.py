"""O3's gate for LLM unlearning adapters: an OOD detector per request over FAISS-indexed forget features,
and a router that gives serving a weight per adapter and input. A library: it never imports `daemon`.

    encoder = Encoder()                                        # frozen MiniLM-L6, shared by every request
    fit_request_gate(texts, adapter_dir / "gate", encoder, adapter_id=aid)   # after training the adapter
    router = Router(encoder); router.add(aid, adapter_dir / "gate")         # serving
    router.route(["Where was X born?"])  ->  [{aid: 0.97}]
    with per_sample_adapters(peft_model, routes): peft_model.generate(...)
    routed = RoutedModel(model, tokenizer, router)   # what `unlearnd serve` runs: chat in, routed adapters at
    routed.add_adapter(aid, adapter_dir)              # full strength, the base model for everything else
"""

from detector.features import Encoder
from detector.gate import RequestGate, fit_gate_from_features, fit_request_gate
from detector.per_sample_lora import per_sample_adapters
from detector.routed_model import Completion, PromptTooLong, RoutedModel, Routing, Sampling
from detector.router import Router, RouterConfig

__all__ = ["Completion", "Encoder", "PromptTooLong", "RequestGate", "RoutedModel", "Router", "RouterConfig", "Routing",
           "Sampling", "fit_gate_from_features", "fit_request_gate", "per_sample_adapters"]
