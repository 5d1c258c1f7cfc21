// The tokenizer inside a checkpoint's index.h5 or a model file (docs/checkpoints.md,
// docs/outputs.md): dataset /tokenizer, uint8, the SentencePiece model's or token table's
// file bytes, with
// attribute `hash` (u64, mp_tokenizer_hash). No dataset: bytes.
#include <stdio.h>
#include <stdlib.h>
#include "ckpt/h5util.h"
#include "core/log.h"
#include "millipede/tokenizer.h"

void mp_h5_write_tokenizer(hid_t file, const struct mp_tokenizer *t) {
    if (!t || mp_tokenizer_hash(t) == 0) return;
    size_t len;
    const unsigned char *model = mp_tokenizer_model(t, &len);
    hsize_t dims[1] = {len};
    hid_t sp = MP_CHECK_H5(H5Screate_simple(1, dims, NULL));
    hid_t d = MP_CHECK_H5(H5Dcreate2(file, "tokenizer", H5T_STD_U8LE, sp, H5P_DEFAULT,
                                     H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Dwrite(d, H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, model));
    uint64_t hash = mp_tokenizer_hash(t);
    mp_h5_write_scalar_attr(d, "hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &hash);
    MP_CHECK_H5(H5Dclose(d));
    MP_CHECK_H5(H5Sclose(sp));
}

int mp_h5_read_tokenizer(hid_t file, const char *path, struct mp_tokenizer **out, char *err,
                         size_t err_len) {
    *out = NULL;
    if (!mp_h5_exists(file, "/tokenizer")) return 0;
    hid_t d = H5Dopen2(file, "/tokenizer", H5P_DEFAULT);
    hid_t sp = d >= 0 ? H5Dget_space(d) : -1;
    hid_t ty = d >= 0 ? H5Dget_type(d) : -1;
    hsize_t n = 0;
    int ok = sp >= 0 && ty >= 0 && H5Sget_simple_extent_ndims(sp) == 1 &&
             H5Sget_simple_extent_dims(sp, &n, NULL) == 1 && H5Tget_class(ty) == H5T_INTEGER &&
             H5Tget_size(ty) == 1 && n > 0 && n < ((hsize_t)1 << 31);
    unsigned char *bytes = ok ? malloc((size_t)n) : NULL;
    uint64_t want = 0;
    ok = ok && bytes &&
         H5Dread(d, H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes) >= 0;
    hid_t a = ok && H5Aexists(d, "hash") > 0 ? H5Aopen(d, "hash", H5P_DEFAULT) : -1;
    ok = ok && a >= 0 && H5Aread(a, H5T_NATIVE_UINT64, &want) >= 0;
    if (a >= 0) H5Aclose(a);
    if (ty >= 0) H5Tclose(ty);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    if (!ok) {
        free(bytes);
        return mp_errf(err, err_len, "%s: dataset '/tokenizer' is unreadable (expected uint8 "
                       "bytes of a SentencePiece model or token table with attribute 'hash')",
                       path);
    }
    char name[1100];
    snprintf(name, sizeof name, "%s: dataset '/tokenizer'", path);
    struct mp_tokenizer *t = mp_tokenizer_parse(bytes, (size_t)n, name, err, err_len);
    free(bytes);
    if (!t) return -1;
    uint64_t got = mp_tokenizer_hash(t);
    if (got != want) {
        mp_tokenizer_free(t);
        return mp_errf(err, err_len, "%s: dataset '/tokenizer': hash %016llx recorded, its bytes "
                       "hash to %016llx (corrupt)", path, (unsigned long long)want,
                       (unsigned long long)got);
    }
    *out = t;
    return 0;
}
