// bf16 GEMMs whose epilogue adds the bias, through cuBLASLt (bf16 mode's matmul forward).
// A separate bias pass reads and writes every output element once more: 18 activations of
// (tokens, d_model) fp32 per dense block at GPT-2 small, about 2.6 ms a step by bytes
// (docs/cuda.md, "The bias in the GEMM's epilogue"). The epilogue adds the bias to the fp32
// sum before the one store.
//
// A plan (descriptors and the heuristic's algorithm) is kept per shape and per alignment of
// the pointers: the heuristic picks for the alignments the preference promises (256 bytes
// unless told) and for the bias pointer in the descriptor, so each promise is the pointers'
// own. The same call always runs the same plan, so results stay bitwise repeatable, and only
// algorithms that split no sum are asked for (reduction scheme NONE: no split-K reduction
// whose order could vary). A shape or alignment for which cuBLASLt has no algorithm (or whose
// heuristic call fails), or a bias less than 16-byte aligned (where cuBLASLt's bias
// epilogue has been reported to fail on A100s), answers 0 and the caller adds the bias with
// its own kernel.
#include <cublasLt.h>
#include <string.h>
#include "backend/cuda/cuda.h"
#include "backend/cuda/cuda_common.h"

#define LT_PLANS 64
#define LT_WORKSPACE ((size_t)32 << 20)   // bytes the heuristic may plan to use
#define LT_BIAS_ALIGN 16

typedef struct {
    int m, n, k, lda, ldb, ldd;   // the column-major problem cuBLASLt is given
    uint32_t align[4];            // bytes: its A, B, D and the bias
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
    int ok;                       // 0: no algorithm, the caller adds the bias
} lt_plan;

static cublasLtHandle_t g_lt;
static lt_plan g_plans[LT_PLANS];
static int g_n_plans, g_evict, g_said;

// the largest power of two up to 256 that divides the address
static uint32_t pointer_alignment(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 1;
    while (al < 256 && a % (2 * al) == 0) al *= 2;
    return al;
}

// a column-major operand's columns start at p + j * ld_bytes: what all of them share
static uint32_t operand_alignment(const void *p, size_t ld_bytes) {
    uint32_t a = pointer_alignment(p), l = pointer_alignment((const void *)(uintptr_t)ld_bytes);
    return a < l ? a : l;
}

static void plan_free(lt_plan *p) {
    if (!p->op) return;
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(p->op));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->a));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->b));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->d));
    memset(p, 0, sizeof *p);
}

// D (m x n) = op(A) (m x k, A stored k x m: transposed) . B (k x n) + bias (m), column-major;
// the heuristic's first algorithm for it, or ok = 0
static void plan_make(lt_plan *p, const float *bias) {
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    int32_t bias_type = CUDA_R_32F;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                                sizeof epilogue));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof bias));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                &bias_type, sizeof bias_type));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, p->k, p->m, p->lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, p->k, p->n, p->ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, CUDA_R_32F, p->m, p->n, p->ldd));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = LT_WORKSPACE;
    uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &ws, sizeof ws));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                      &none, sizeof none));
    const cublasLtMatmulPreferenceAttributes_t align_attr[3] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES};
    for (int i = 0; i < 3; i++)   // C is D (beta 0, in place)
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &p->align[i],
                                                          sizeof p->align[i]));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                      &p->align[2], sizeof p->align[2]));
    cublasLtMatmulHeuristicResult_t r;
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(g_lt, p->op, p->a, p->b, p->d, p->d, pref, 1,
                                                      &r, &found);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    // no algorithm, or the configuration refused: the GEMM and the bias kernel take the call,
    // slower, not wrong; said once, for the profile's readers
    p->ok = s == CUBLAS_STATUS_SUCCESS && found > 0 && r.state == CUBLAS_STATUS_SUCCESS;
    if (p->ok) {
        p->algo = r.algo;
    } else if (!g_said) {
        g_said = 1;
        mp_log("cuda: cuBLASLt has no bias-epilogue algorithm for a (%d x %d x %d) GEMM (status "
               "%d, %d found): the bias is added by a kernel where that happens", p->m, p->n,
               p->k, (int)s, found);
    }
}

static lt_plan *plan_for(const lt_plan *key, const float *bias) {
    for (int i = 0; i < g_n_plans; i++) {
        lt_plan *p = &g_plans[i];
        if (p->m == key->m && p->n == key->n && p->k == key->k && p->lda == key->lda &&
            p->ldb == key->ldb && p->ldd == key->ldd && !memcmp(p->align, key->align, sizeof p->align))
            return p;
    }
    lt_plan *p;
    if (g_n_plans < LT_PLANS) {
        p = &g_plans[g_n_plans++];
    } else {   // more shapes than plans: the oldest goes (a rebuild costs only host time)
        p = &g_plans[g_evict];
        g_evict = (g_evict + 1) % LT_PLANS;
        plan_free(p);
    }
    *p = *key;
    plan_make(p, bias);
    return p;
}

extern "C" void mp_cuda_lt_forget_plans(void) {
    for (int i = 0; i < g_n_plans; i++) plan_free(&g_plans[i]);
    g_n_plans = g_evict = 0;
}

int mp_cuda_gemm_bf16_bias(int M, int N, int K, const uint16_t *A, int lda, const uint16_t *B,
                           int ldb, const float *bias, float *C, int ldc) {
    if (M <= 0 || N <= 0 || K <= 0 || !bias || pointer_alignment(bias) < LT_BIAS_ALIGN) return 0;
    if (!g_lt) CUBLAS_CHECK(cublasLtCreate(&g_lt));
    // row-major C (M, N) is column-major C^T (N x M) = B (N x K, stored K x N) . A^T (K x M)
    lt_plan key;
    memset(&key, 0, sizeof key);
    key.m = N;
    key.n = M;
    key.k = K;
    key.lda = ldb;
    key.ldb = lda;
    key.ldd = ldc;
    key.align[0] = operand_alignment(B, (size_t)ldb * sizeof(uint16_t));
    key.align[1] = operand_alignment(A, (size_t)lda * sizeof(uint16_t));
    key.align[2] = operand_alignment(C, (size_t)ldc * sizeof(float));
    key.align[3] = pointer_alignment(bias);
    lt_plan *p = plan_for(&key, bias);
    if (!p->ok) return 0;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof bias));
    float alpha = 1.0f, beta = 0.0f;
    void *ws = mp_cuda_scratch(SCR_LT_WORKSPACE, LT_WORKSPACE);
    CUBLAS_CHECK(cublasLtMatmul(g_lt, p->op, &alpha, B, p->a, A, p->b, &beta, C, p->d, C, p->d,
                                &p->algo, ws, LT_WORKSPACE, 0));
    mp_cuda_mark("cublasLtMatmul bf16 + bias", __FILE__, __LINE__);
    return 1;
}
