"""The exploration behind the default recipe's settings (docs/recipe.md): a plain training loop, no Lightning.

    python recipes/explore_modes.py MODE RANK_SCALE LR STEPS [R_MAX]
    python recipes/explore_modes.py rowwise rank 1e-2 600

Same bundled base and Encode data as the recipe, the MatryoshkaLoRA settings of recipes/configs/default.yaml
except ``mode``/``rank_scale``, AdamW with 20 warm-up steps and linear decay, batch 32, seed 0, one CPU
thread. Prints, per eval rank, the answer-token accuracy on the first 200 validation examples (teacher
forcing) and the greedy exact match on the first 100, before and after training, with the AURAC of each.
"""
import sys, time, torch
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(1, str(HERE.parent))
torch.set_num_threads(1)
from instruct_data import InstructData, collate, final_answer
from transformers import AutoModelForCausalLM
from lightning_matlora import MatryoshkaLoRA, at_rank, aurac, begin_step
mode, rule, lr, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
r_max = int(sys.argv[5]) if len(sys.argv) > 5 else 16
torch.manual_seed(0)
dm = InstructData(tokenizer=str(HERE / 'assets' / 'base'), max_length=64); dm.setup('fit')
tok = dm.tokenizer
model = AutoModelForCausalLM.from_pretrained(str(HERE / 'assets' / 'base'))
cb = MatryoshkaLoRA(r_max=r_max, mode=mode, rank_scale=rule, verbose=False, save_adapter=False, rank_eval=None)
cb.apply(model)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s+1)/20, max(0.0, (steps-s)/(steps-20))))
val = dm.splits['val'][:200]
def evaluate():
    model.eval(); res = {}
    vb = collate(val, tok.pad_token_id)
    for k in cb.config.eval_ranks:
        with torch.no_grad(), at_rank(model, k):
            lg = model(input_ids=vb['input_ids'], attention_mask=vb['attention_mask']).logits[:, :-1]
            lab = vb['labels'][:, 1:]; m = lab != -100
            acc = 100 * float(((lg.argmax(-1) == lab) & m).sum() / m.sum())
            # greedy EM on 100
            ex = val[:100]; n = max(e.n_prompt for e in ex)
            ids = torch.full((len(ex), n), tok.pad_token_id); am = torch.zeros_like(ids)
            for j, e in enumerate(ex):
                ids[j, n-e.n_prompt:] = torch.tensor(e.input_ids[:e.n_prompt]); am[j, n-e.n_prompt:] = 1
            g = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            txt = tok.batch_decode(g[:, n:], skip_special_tokens=True)
            em = 100 * sum(final_answer(t) == e.reference for t, e in zip(txt, ex)) / len(ex)
        res[k] = (round(acc, 1), round(em, 1))
    model.train(); return res
print('base', evaluate(), flush=True)
g = torch.Generator().manual_seed(0); train = dm.splits['train']; step = 0; t0 = time.time()
while step < steps:
    for i in torch.randperm(len(train), generator=g).split(32):
        if len(i) < 32: continue
        b = collate([train[j] for j in i], tok.pad_token_id)
        begin_step(model, step)
        loss = model(**b).loss; loss.backward(); opt.step(); sched.step(); opt.zero_grad(); step += 1
        if step % 100 == 0: print(step, round(float(loss), 3), f'{time.time()-t0:.0f}s', flush=True)
        if step >= steps: break
r = evaluate()
print(mode, rule, lr, steps, r, 'AURAC acc', round(aurac(list(r), [v[0] for v in r.values()]), 1),
      'em', round(aurac(list(r), [v[1] for v in r.values()]), 1), flush=True)
