// mobilemoe-logits: one llama_decode of the given tokens, every position's logits to a file.
//
//   mobilemoe-logits MODEL.gguf TOKENS.txt OUT.f32 [THREADS]
//
// TOKENS.txt: token ids separated by whitespace. OUT.f32: float32 [n_tokens, n_vocab], row-major.
// Used by bench/llamacpp.py as the conversion check (llama.cpp's F16 logits vs our PyTorch model).
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.txt OUT.f32 [THREADS]\n", argv[0]);
        return 2;
    }
    int n_threads = argc > 4 ? atoi(argv[4]) : 1;

    FILE * ft = fopen(argv[2], "r");
    if (!ft) { fprintf(stderr, "%s: cannot open\n", argv[2]); return 1; }
    int cap = 4096, n = 0;
    llama_token * tokens = malloc(sizeof(llama_token) * cap);
    int t;
    while (fscanf(ft, "%d", &t) == 1) {
        if (n == cap) { cap *= 2; tokens = realloc(tokens, sizeof(llama_token) * cap); }
        tokens[n++] = t;
    }
    fclose(ft);
    if (n == 0) { fprintf(stderr, "%s: no token ids\n", argv[2]); return 1; }

    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "%s: cannot load model\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n; cp.n_batch = n; cp.n_ubatch = n; cp.n_seq_max = 1;
    cp.n_threads = n_threads; cp.n_threads_batch = n_threads;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context of %d tokens\n", n); return 1; }

    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }

    FILE * fo = fopen(argv[3], "wb");
    if (!fo) { fprintf(stderr, "%s: cannot write\n", argv[3]); return 1; }
    for (int i = 0; i < n; i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (fwrite(row, sizeof(float), n_vocab, fo) != (size_t) n_vocab) { fprintf(stderr, "%s: short write\n", argv[3]); return 1; }
    }
    fclose(fo);
    printf("%d %d\n", n, n_vocab);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(tokens);
    return 0;
}
