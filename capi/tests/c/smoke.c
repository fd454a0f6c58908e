/* A C caller of libmoe_runner: creates a layer from a checkpoint on the CPU, checks what it
 * expects, runs it on inputs read from files and writes the output; then checks that bad calls
 * come back as error codes with a message; and runs the routed entry point on routing read
 * from files. Usage: smoke CKPT HIDDEN.bin LOGITS.bin TOKENS OUT.bin IDS.bin WEIGHTS.bin ROUTED.bin */
#include "moe_runner.h"
#include <stdio.h>
#include <string.h>

static int expect(MoeStatus got, MoeStatus want, const char *what) {
    char msg[512];
    moe_last_error(msg, sizeof msg);
    if (got != want) {
        fprintf(stderr, "%s: status %d, expected %d (%s)\n", what, (int)got, (int)want, msg);
        return 1;
    }
    if (want != MOE_STATUS_OK && msg[0] == 0) {
        fprintf(stderr, "%s: no error message\n", what);
        return 1;
    }
    return 0;
}

static long read_file(const char *path, void *buf, long cap) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    long n = (long)fread(buf, 1, (size_t)cap, f);
    fclose(f);
    return n;
}

static unsigned char hidden[1 << 20], out[1 << 20];
static float logits[1 << 16], topk_weights[1 << 16];
static int topk_ids[1 << 16];

static int write_file(const char *path, const void *buf, long n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    int bad = fwrite(buf, 1, (size_t)n, f) != (size_t)n;
    fclose(f);
    return bad;
}

int main(int argc, char **argv) {
    if (argc != 9) return 2;
    long tokens = atol(argv[4]);
    MoeOptions opts;
    memset(&opts, 0, sizeof opts);
    opts.runner = "reference";
    opts.max_tokens = 64;
    MoeLayer *layer = NULL;
    int bad = 0;
    bad |= expect(moe_layer_create(argv[1], &opts, &layer), MOE_STATUS_OK, "create");
    if (bad) return 1;
    MoeLayerInfo info;
    bad |= expect(moe_layer_info(layer, &info), MOE_STATUS_OK, "info");
    if (info.activation_dtype != 1 || info.on_gpu != 0) bad |= 1;
    const char *path = moe_layer_path(layer);
    if (!path || !strstr(path, "reference")) { fprintf(stderr, "path: %s\n", path ? path : "(null)"); bad |= 1; }
    long hb = tokens * info.hidden_size * 2, lb = tokens * info.num_experts * 4;
    if (read_file(argv[2], hidden, sizeof hidden) != hb || read_file(argv[3], logits, sizeof logits) != lb) {
        fprintf(stderr, "inputs do not have %ld and %ld bytes\n", hb, lb);
        return 1;
    }
    bad |= expect(moe_layer_forward(layer, hidden, logits, out, tokens), MOE_STATUS_OK, "forward");
    if (write_file(argv[5], out, hb)) return 1;
    long kb = tokens * info.top_k * 4;
    if (read_file(argv[6], topk_ids, sizeof topk_ids) != kb || read_file(argv[7], topk_weights, sizeof topk_weights) != kb) {
        fprintf(stderr, "routing files do not have %ld bytes\n", kb);
        return 1;
    }
    memset(out, 0, sizeof out);
    bad |= expect(moe_layer_forward_routed(layer, hidden, topk_ids, topk_weights, out, tokens), MOE_STATUS_OK, "forward_routed");
    if (write_file(argv[8], out, hb)) return 1;
    bad |= expect(moe_layer_forward_routed(layer, hidden, NULL, topk_weights, out, tokens), MOE_STATUS_INVALID_ARGUMENT, "null topk_ids");
    bad |= expect(moe_layer_forward_routed(layer, hidden, topk_ids, topk_weights, out, -1), MOE_STATUS_INVALID_ARGUMENT, "negative tokens");
    /* Bad calls: typed errors, never a crash. */
    bad |= expect(moe_layer_forward(layer, NULL, logits, out, tokens), MOE_STATUS_INVALID_ARGUMENT, "null hidden");
    bad |= expect(moe_layer_forward(NULL, hidden, logits, out, tokens), MOE_STATUS_INVALID_ARGUMENT, "null layer");
    bad |= expect(moe_layer_forward(layer, hidden, logits, out, 65), MOE_STATUS_INVALID_ARGUMENT, "too many tokens");
    bad |= expect(moe_layer_info(NULL, &info), MOE_STATUS_INVALID_ARGUMENT, "null info layer");
    MoeLayer *other = NULL;
    bad |= expect(moe_layer_create("/nonexistent/checkpoint", NULL, &other), MOE_STATUS_CHECKPOINT, "missing dir");
    bad |= expect(moe_layer_create(NULL, NULL, &other), MOE_STATUS_INVALID_ARGUMENT, "null dir");
    opts.runner = "no_such_runner";
    bad |= expect(moe_layer_create(argv[1], &opts, &other), MOE_STATUS_NO_PATH, "unknown runner");
    if (moe_layer_path(NULL) != NULL) bad |= 1;
    moe_layer_destroy(layer);
    moe_layer_destroy(NULL);
    return bad;
}
