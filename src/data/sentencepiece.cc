// src/data/spm.h over libsentencepiece (Debian's libsentencepiece-dev).
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

extern "C" {
#include "data/spm.h"
}

struct mp_spm {
    sentencepiece::SentencePieceProcessor proc;
};

static int fail(char *err, size_t err_len, const char *what, const std::string &msg) {
    if (err && err_len) snprintf(err, err_len, "%s: %s", what, msg.c_str());
    return -1;
}

// The training text line by line, without a temporary file.
namespace {
class Lines : public sentencepiece::SentenceIterator {
  public:
    Lines(const char *text, size_t n) : p_(text), end_(text + n) { Next(); }
    bool done() const override { return done_; }
    void Next() override {
        while (p_ < end_) {
            const char *nl = static_cast<const char *>(memchr(p_, '\n', (size_t)(end_ - p_)));
            const char *stop = nl ? nl : end_;
            line_.assign(p_, (size_t)(stop - p_));
            p_ = nl ? nl + 1 : end_;
            if (!line_.empty()) return;
        }
        done_ = true;
    }
    const std::string &value() const override { return line_; }
    sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

  private:
    const char *p_, *end_;
    std::string line_;
    bool done_ = false;
};
}  // namespace

extern "C" int mp_spm_available(void) { return 1; }

extern "C" int mp_spm_train(const char *text, size_t n, int vocab, const char *type,
                            unsigned char **model, size_t *model_len, char *err, size_t err_len) {
    // Every text must round-trip exactly, as with bytes: no normalization, whitespace kept
    // as it is, no space added in front, and byte fallback (text outside the learned pieces,
    // a newline among them, becomes <0xAB> byte pieces, never the unknown piece). Digits
    // split, as usual for LMs. The whole training text is used (no sampling, one thread),
    // so the model depends on the corpus only.
    std::unordered_map<std::string, std::string> args = {
        {"model_type", type},
        {"vocab_size", std::to_string(vocab)},
        {"normalization_rule_name", "identity"},
        {"remove_extra_whitespaces", "false"},
        {"add_dummy_prefix", "false"},
        {"byte_fallback", "true"},
        {"split_digits", "true"},
        {"character_coverage", "0.9995"},
        {"input_sentence_size", "0"},
        {"shuffle_input_sentence", "false"},
        {"max_sentence_length", "1000000"},
        {"num_threads", "1"},
        {"minloglevel", "2"},
        {"model_prefix", ""},
    };
    Lines lines(text, n);
    std::string proto;
    auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &proto);
    if (!status.ok()) return fail(err, err_len, "SentencePiece training failed", status.ToString());
    *model = static_cast<unsigned char *>(malloc(proto.size()));
    if (!*model) return fail(err, err_len, "SentencePiece training", "out of memory");
    memcpy(*model, proto.data(), proto.size());
    *model_len = proto.size();
    return 0;
}

extern "C" mp_spm *mp_spm_load(const void *model, size_t len, char *err, size_t err_len) {
    mp_spm *p = new mp_spm;
    auto status = p->proc.LoadFromSerializedProto(
        std::string(static_cast<const char *>(model), len));
    if (!status.ok()) {
        fail(err, err_len, "not a SentencePiece model", status.ToString());
        delete p;
        return nullptr;
    }
    return p;
}

extern "C" void mp_spm_free(mp_spm *p) { delete p; }

extern "C" int mp_spm_vocab(const mp_spm *p) { return p->proc.GetPieceSize(); }

extern "C" long mp_spm_encode(const mp_spm *p, const char *text, size_t n, int32_t **ids,
                              char *err, size_t err_len) {
    std::vector<int> out;
    auto status = p->proc.Encode(std::string(text, n), &out);
    if (!status.ok()) return fail(err, err_len, "SentencePiece encoding failed", status.ToString());
    *ids = static_cast<int32_t *>(malloc((out.size() ? out.size() : 1) * sizeof(int32_t)));
    if (!*ids) return fail(err, err_len, "SentencePiece encoding", "out of memory");
    for (size_t i = 0; i < out.size(); i++) (*ids)[i] = out[i];
    return (long)out.size();
}

extern "C" long mp_spm_decode(const mp_spm *p, const int32_t *ids, size_t n, char **text,
                              char *err, size_t err_len) {
    std::vector<int> in(ids, ids + n);
    std::string out;
    auto status = p->proc.Decode(in, &out);
    if (!status.ok()) return fail(err, err_len, "SentencePiece decoding failed", status.ToString());
    *text = static_cast<char *>(malloc(out.size() + 1));
    if (!*text) return fail(err, err_len, "SentencePiece decoding", "out of memory");
    memcpy(*text, out.data(), out.size());
    (*text)[out.size()] = '\0';
    return (long)out.size();
}

extern "C" size_t mp_spm_piece_bytes(const mp_spm *p, int id) {
    if (p->proc.IsByte(id)) return 1;
    if (p->proc.IsControl(id) || p->proc.IsUnknown(id)) return 0;
    // U+2581 (3 bytes in UTF-8) stands for one space
    const std::string &piece = p->proc.IdToPiece(id);
    size_t marks = 0;
    for (size_t i = piece.find("\xe2\x96\x81"); i != std::string::npos; i = piece.find("\xe2\x96\x81", i + 3))
        marks++;
    return piece.size() - 2 * marks;
}
