"""Share of py-spy samples (``py-spy record --format raw``, collapsed stacks) of vLLM's model worker
by what the innermost recognisable frame is doing: linear layers, attention, norms, sampling...
Usage: python categorize.py PROFILE.txt [...]"""
import re, collections, sys
def classify(frames):
    s=';'.join(frames)
    if 'execute_model' not in s and 'sample_tokens' not in s: return None
    for f in reversed(frames):
        if re.search(r'sampler|Sampler|sample_tokens|compute_logprobs|topk_topp|random_sample|greedy', f): return 'sampling'
        if re.search(r'compute_logits|LogitsProcessor|lm_head', f): return 'LM head (logits matmul)'
        if re.search(r'Attention|attn_|attention|cpu_attn', f) and not re.search(r'qkv_proj|o_proj|LlamaAttention.forward', f): return 'attention kernel'
        if re.search(r'Linear|linear|_apply|dispatch_cpu_unquantized_gemm|gemm', f): return 'linear layers (matmul)'
        if re.search(r'SiluAndMul|silu|RMSNorm|rms_norm|rotary|RotaryEmbedding|act_fn', f): return 'norms, activation, rotary'
    if re.search(r'prepare_inputs|_prepare|update_states|_update_states|build_attn|metadata|_preprocess', s): return 'input preparation (Python)'
    if 'forward' in s: return 'other model code'
    return 'other engine step'
for path in sys.argv[1:]:
    tot=0; c=collections.Counter(); leaves=collections.Counter()
    for line in open(path):
        line=line.rstrip()
        if not line: continue
        stack,_,n=line.rpartition(' '); n=int(n); tot+=n
        frames=stack.split(';'); k=classify(frames)
        c[k or 'idle / waiting for work']+=n
        if k: leaves[frames[-1][:100]]+=n
    busy=tot-c['idle / waiting for work']
    print(f'== {path}: {tot} samples, busy {busy}')
    for k,v in c.most_common(): print(f'  {k:32s} {v:6d}  {100*v/max(busy,1):5.1f}% of busy' if k!='idle / waiting for work' else f'  {k:32s} {v:6d}')
    for k,v in leaves.most_common(12): print('     leaf', v, k)
