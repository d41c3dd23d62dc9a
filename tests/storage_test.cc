// Hashing, chunked blob writes and the upload validator (no LibTorch involved).
#include <gtest/gtest.h>

#include <chrono>

#include <filesystem>
#include <fstream>

#include "common/retry.h"
#include "common/sha256.h"
#include "server/archive_check.h"
#include "server/blob_store.h"
#include "test_util.h"
#include "worker/recipe_convert.h"

namespace pare::server {
namespace {

namespace fs = std::filesystem;
using pare::testing::CountFiles;
using pare::testing::Fixture;
using pare::testing::TempDir;

TEST(Sha256Test, KnownVectorsAndChunkingAgree) {
  EXPECT_EQ(Sha256::Of(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256::Of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::string data(3 << 20, 'x');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31);
  Sha256 chunked;
  for (size_t off = 0; off < data.size(); off += 1000003)
    chunked.Update(data.data() + off, std::min<size_t>(1000003, data.size() - off));
  EXPECT_EQ(chunked.HexDigest(), Sha256::Of(data));
  EXPECT_TRUE(IsHexSha256(Sha256::Of("x")));
  EXPECT_FALSE(IsHexSha256("../../etc/passwd"));
}

TEST(RetryTest, EveryRetryLoopDoublesItsWaitUpToACap) {
  using std::chrono::milliseconds;
  EXPECT_EQ(RetryDelay(1, milliseconds(100), milliseconds(5000)), milliseconds(100));
  EXPECT_EQ(RetryDelay(2, milliseconds(100), milliseconds(5000)), milliseconds(200));
  EXPECT_EQ(RetryDelay(6, milliseconds(100), milliseconds(5000)), milliseconds(3200));
  EXPECT_EQ(RetryDelay(7, milliseconds(100), milliseconds(5000)), milliseconds(5000));
  EXPECT_EQ(RetryDelay(1000, milliseconds(100), milliseconds(5000)), milliseconds(5000));
  EXPECT_EQ(RetryDelay(0, milliseconds(100), milliseconds(5000)), milliseconds(100));
}

class BlobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = FileBlobStore::Open(dir_.path() + "/blobs", dir_.path() + "/tmp");
    ASSERT_TRUE(s.ok());
    blobs_ = std::move(s).value();
  }
  TempDir dir_;
  std::unique_ptr<FileBlobStore> blobs_;
};

TEST_F(BlobStoreTest, CommitsWholeVerifiedContentOnce) {
  std::string content = "model bytes";
  for (int copy = 0; copy < 2; ++copy) {
    auto w = blobs_->NewWriter(1024);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(w.value()->Append(content.data(), 5).ok());
    ASSERT_TRUE(w.value()->Append(content.data() + 5, content.size() - 5).ok());
    auto sha = w.value()->Commit(content.size(), Sha256::Of(content));
    ASSERT_TRUE(sha.ok()) << sha.status().ToString();
    EXPECT_EQ(sha.value(), Sha256::Of(content));
  }
  EXPECT_EQ(CountFiles(dir_.path() + "/blobs"), 1u);  // identical content stored once
  EXPECT_EQ(CountFiles(blobs_->tmp_dir()), 0u);
  EXPECT_EQ(blobs_->SizeOf(Sha256::Of(content)).value(), content.size());
  auto r = blobs_->NewReader(Sha256::Of(content));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::string part;
  ASSERT_TRUE(r.value()->ReadAt(6, 100, &part).ok());
  EXPECT_EQ(part, "bytes");
  EXPECT_EQ(blobs_->CountAndBytes().value(), std::make_pair(uint64_t{1}, uint64_t{content.size()}));
  EXPECT_FALSE(blobs_->Has(Sha256::Of("other")).value());
  EXPECT_EQ(blobs_->NewReader("../../etc/passwd").status().code(), Code::kNotFound);
}

TEST_F(BlobStoreTest, WrongSizeDigestOrCheckLeavesNothing) {
  auto w1 = blobs_->NewWriter(100);
  ASSERT_TRUE(w1.value()->Append("abc", 3).ok());
  EXPECT_EQ(w1.value()->Commit(4, "").status().code(), Code::kInvalidArgument);
  auto w2 = blobs_->NewWriter(100);
  ASSERT_TRUE(w2.value()->Append("abc", 3).ok());
  EXPECT_EQ(w2.value()->Commit(3, Sha256::Of("abd")).status().code(), Code::kInvalidArgument);
  auto w3 = blobs_->NewWriter(100);
  ASSERT_TRUE(w3.value()->Append("abc", 3).ok());
  auto r3 = w3.value()->Commit(3, "", [](const std::string&) { return InvalidArgument("not a model"); });
  EXPECT_EQ(r3.status().message(), "not a model");
  auto w4 = blobs_->NewWriter(4);
  EXPECT_EQ(w4.value()->Append("abcde", 5).code(), Code::kResourceExhausted);
  w4.value().reset();  // an abandoned upload removes its temporary file
  EXPECT_EQ(CountFiles(blobs_->tmp_dir()), 0u);
  EXPECT_FALSE(fs::exists(dir_.path() + "/blobs/" + Sha256::Of("abc").substr(0, 2)));
}

TEST_F(BlobStoreTest, OpenRemovesTemporaryFilesACrashLeft) {
  // On a shared folder, a crash's file (untouched for over an hour) goes and another server's
  // upload in progress (written just now) stays.
  std::ofstream(blobs_->tmp_dir() + "/upload_half") << "partial";
  fs::last_write_time(blobs_->tmp_dir() + "/upload_half",
                      fs::file_time_type::clock::now() - std::chrono::hours(2));
  std::ofstream(blobs_->tmp_dir() + "/upload_live") << "in progress";
  auto shared = FileBlobStore::Open(dir_.path() + "/blobs", dir_.path() + "/tmp", /*shared=*/true);
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ(CountFiles(blobs_->tmp_dir()), 1u);
  EXPECT_TRUE(fs::exists(blobs_->tmp_dir() + "/upload_live"));
  // A folder of its own: everything left there is a crash's.
  auto own = FileBlobStore::Open(dir_.path() + "/blobs", dir_.path() + "/tmp");
  ASSERT_TRUE(own.ok());
  EXPECT_EQ(CountFiles(blobs_->tmp_dir()), 0u);
}

TEST(ArchiveCheckTest, AcceptsRealTorchScriptAndNamesWhatIsWrong) {
  ArchiveLimits limits;
  EXPECT_TRUE(CheckTorchScriptArchive(Fixture("small_cnn.pt"), limits).ok());
  EXPECT_TRUE(CheckTorchScriptArchive(Fixture("resnet18.pt"), limits).ok());
  auto expect = [&](const std::string& f, const std::string& words) {
    Status s = CheckTorchScriptArchive(Fixture(f), limits);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << f;
    EXPECT_NE(s.message().find(words), std::string::npos) << f << ": " << s.message();
  };
  expect("garbage.bin", "not a zip archive");
  expect("truncated.pt", "not a zip archive");
  expect("not_torchscript.zip", "not a PyTorch archive");
  expect("mnist_like.pt", "no TorchScript code");
  expect("zip_slip.pt", "unsafe path");
  ArchiveLimits small;
  small.max_uncompressed_bytes = 16 << 20;
  Status bomb = CheckTorchScriptArchive(Fixture("bomb.pt"), small);
  EXPECT_EQ(bomb.code(), Code::kInvalidArgument);
  EXPECT_NE(bomb.message().find("uncompressed"), std::string::npos) << bomb.message();
}

TEST(ArchiveCheckTest, DatasetsByFormat) {
  ArchiveLimits limits;
  EXPECT_TRUE(CheckDataset(Fixture("mnist_like.pt"), "tensors", limits).ok());
  EXPECT_TRUE(CheckDataset(Fixture("idx-images.gz"), "idx", limits).ok());
  EXPECT_EQ(CheckDataset(Fixture("idx-bad-magic"), "idx", limits).code(), Code::kInvalidArgument);
  EXPECT_EQ(CheckDataset(Fixture("garbage.bin"), "tensors", limits).code(), Code::kInvalidArgument);
  for (const char* tar : {"tar_absolute.tar", "tar_dotdot.tar", "tar_symlink.tar"}) {
    EXPECT_EQ(CheckDataset(Fixture(tar), "image-folder", limits).code(), Code::kInvalidArgument) << tar;
    EXPECT_EQ(CheckDataset(Fixture(tar), "idx", limits).code(), Code::kInvalidArgument) << tar;
  }
  EXPECT_EQ(CheckDataset(Fixture("mnist_like.pt"), "csv", limits).code(), Code::kInvalidArgument);
}

// A misspelt field is named with where it was and what that place has.
TEST(RecipeTest, AnUnknownFieldIsNamedWithTheFieldsItCouldHaveBeen) {
  for (const auto& [json, message] : std::vector<std::pair<std::string, std::string>>{
           {R"({"steps":[{"prune":{"chanel":{}}}]})",
            "recipe.steps[0].prune has no field 'chanel' (it has: magnitude, channel, nm)"},
           {R"({"step":[]})", "recipe has no field 'step' (it has: steps)"},
           {R"({"steps":[{"quantize":{"static":{"observr":"MINMAX"}}}]})",
            "recipe.steps[0].quantize.static has no field 'observr' (it has: observer, calibrationBatches, "
            "perTensorWeights, target, exclude, maxAccuracyDrop)"},
           {R"({"steps":[{"optimize":{}},{"auto":{"maxAccuracyDrop":1,"methodz":[]}}]})",
            "recipe.steps[1].auto has no field 'methodz' (it has: maxAccuracyDrop, relative, objective, "
            "targetSpeedup, timeBudgetSeconds, methods)"}}) {
    auto r = ParseRecipeJson(json);
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << json;
    EXPECT_EQ(r.status().message(), message);
  }
  // A value of the wrong type, and two kinds in one step, in the recipe's names.
  for (const auto& [json, message] : std::vector<std::pair<std::string, std::string>>{
           {R"({"steps":[{"auto":{"maxAccuracyDrop":"one"}}]})",
            "recipe.steps[0].auto.maxAccuracyDrop: invalid value \"one\": a number is expected"},
           {R"({"steps":[{"prune":{"channel":{"roundTo":1.5}}}]})",
            "recipe.steps[0].prune.channel.roundTo: invalid value 1.5: a whole number is expected"},
           {R"({"steps":[{"optimize":{}},{"prune":{"channel":{"amount":0.3}},"quantize":{"dynamic":{}}}]})",
            "recipe.steps[1] names two kinds of step (the second is 'quantize'): a step is one of prune, "
            "quantize, distill, factorize, finetune, optimize, analyze, auto; give each its own step"}}) {
    auto r = ParseRecipeJson(json);
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << json;
    EXPECT_EQ(r.status().message(), message);
  }
}

TEST(RecipeTest, TheIssuesRecipeParsesAndEveryStepConverts) {
  const std::string all = R"({"steps": [
    {"prune":     {"magnitude": {"amount": 0.5, "scope": "GLOBAL"}}},
    {"prune":     {"channel":   {"amount": 0.3, "criterion": "L1"}}},
    {"prune":     {"nm":        {"n": 2, "m": 4}}},
    {"quantize":  {"dynamic":   {}}},
    {"quantize":  {"static":    {"observer": "HISTOGRAM", "calibrationBatches": 16, "target": "AVX2"}}},
    {"quantize":  {"fp16":      {}}},
    {"distill":   {"epochs": 3, "temperature": 4.0, "alpha": 0.7, "learningRate": 0.01, "batchSize": 64}},
    {"factorize": {"rankRatio": 0.5}},
    {"finetune":  {"epochs": 1, "learningRate": 0.01}}
  ]})";
  auto recipe = ParseRecipeJson(all);
  ASSERT_TRUE(recipe.ok()) << recipe.status().ToString();
  EXPECT_EQ(recipe->steps_size(), 9);
  EXPECT_FLOAT_EQ(recipe->steps(6).distill().alpha(), 0.7f);
  auto steps = ToEngineSteps(recipe.value());
  ASSERT_TRUE(steps.ok()) << steps.status().ToString();
  ASSERT_EQ(steps->size(), 9u);
  const auto& channel = std::get<engine::ChannelPruneSpec>(steps->at(1));
  EXPECT_DOUBLE_EQ(channel.amount, 0.3f);
  EXPECT_EQ(channel.round_to, 8);
  EXPECT_FALSE(channel.global);
  auto by_macs =
      ToEngineSteps(ParseRecipeJson(R"({"steps":[{"prune":{"channel":{"targetMacs":0.4}}}]})").value());
  ASSERT_TRUE(by_macs.ok()) << by_macs.status().ToString();
  EXPECT_FLOAT_EQ(std::get<engine::ChannelPruneSpec>(by_macs->at(0)).target_macs, 0.4f);
  EXPECT_DOUBLE_EQ(std::get<engine::FactorizeSpec>(steps->at(7)).rank_ratio, 0.5);
  EXPECT_EQ(std::get<engine::StaticQuantSpec>(steps->at(4)).target, "avx2");
  auto no_target = ToEngineSteps(ParseRecipeJson(R"({"steps":[{"quantize":{"static":{}}}]})").value());
  ASSERT_TRUE(no_target.ok());
  EXPECT_EQ(std::get<engine::StaticQuantSpec>(no_target->at(0)).target, "auto");
  auto mixed = ToEngineSteps(
      ParseRecipeJson(R"({"steps":[{"quantize":{"static":{"exclude":["layer4.1.conv2","fc"]}}}]})").value());
  ASSERT_TRUE(mixed.ok()) << mixed.status().ToString();
  auto frozen = ToEngineSteps(
      ParseRecipeJson(R"({"steps":[{"prune":{"channel":{"amount":0.3}}},{"optimize":{}}]})").value());
  ASSERT_TRUE(frozen.ok()) << frozen.status().ToString();
  EXPECT_TRUE(std::holds_alternative<engine::OptimizeSpec>(frozen->at(1)));
  auto analysis = ToEngineSteps(
      ParseRecipeJson(R"({"steps":[{"analyze":{"pruneAmounts":[0.5],"skipQuantize":true}}]})").value());
  ASSERT_TRUE(analysis.ok()) << analysis.status().ToString();
  EXPECT_EQ(std::get<engine::AnalyzeSpec>(analysis->at(0)).prune_amounts, std::vector<double>{0.5});
  EXPECT_FALSE(std::get<engine::AnalyzeSpec>(analysis->at(0)).quantize);
  auto search = ToEngineSteps(
      ParseRecipeJson(
          R"({"steps":[{"auto":{"maxAccuracyDrop":0.5,"relative":true,"methods":["quantize.static"]}}]})")
          .value());
  ASSERT_TRUE(search.ok()) << search.status().ToString();
  const auto& auto_spec = std::get<engine::AutoSpec>(search->at(0));
  EXPECT_DOUBLE_EQ(auto_spec.max_accuracy_drop, 0.5);
  EXPECT_TRUE(auto_spec.relative);
  EXPECT_EQ(auto_spec.objective, "LATENCY");
  EXPECT_DOUBLE_EQ(auto_spec.time_budget_seconds, 900);
  EXPECT_EQ(auto_spec.methods, std::vector<std::string>{"quantize.static"});
  auto by_layer = ToEngineSteps(
      ParseRecipeJson(R"({"steps":[{"prune":{"channel":{"amount":0.2,"amounts":{"layer4":0.5}}}}]})")
          .value());
  ASSERT_TRUE(by_layer.ok()) << by_layer.status().ToString();
  EXPECT_DOUBLE_EQ(std::get<engine::ChannelPruneSpec>(by_layer->at(0)).amounts.at("layer4"), 0.5);
  EXPECT_EQ(std::get<engine::StaticQuantSpec>(mixed->at(0)).exclude,
            (std::vector<std::string>{"layer4.1.conv2", "fc"}));
  // Accuracy control: absent is off, 0 asks for no loss at all (it used to read as off).
  EXPECT_FALSE(std::get<engine::StaticQuantSpec>(mixed->at(0)).max_accuracy_drop.has_value());
  auto lossless =
      ToEngineSteps(ParseRecipeJson(R"({"steps":[{"quantize":{"static":{"maxAccuracyDrop":0}}}]})").value());
  ASSERT_TRUE(lossless.ok()) << lossless.status().ToString();
  const auto& zero = std::get<engine::StaticQuantSpec>(lossless->at(0)).max_accuracy_drop;
  ASSERT_TRUE(zero.has_value());
  EXPECT_EQ(*zero, 0.0);
  // Bad values are refused by field.
  for (const auto& [json, field] : std::vector<std::pair<std::string, std::string>>{
           {R"({"steps":[{"prune":{"channel":{"amount":1.5}}}]})", "steps[0].prune.channel.amount"},
           {R"({"steps":[{"prune":{"channel":{"criterion":"L3"}}}]})", "steps[0].prune.channel.criterion"},
           {R"({"steps":[{"prune":{"channel":{"scope":"ALL"}}}]})", "steps[0].prune.channel.scope"},
           {R"({"steps":[{"prune":{"channel":{"targetMacs":1.5}}}]})", "steps[0].prune.channel.targetMacs"},
           {R"({"steps":[{"prune":{"channel":{"targetMacs":-0.5}}}]})", "steps[0].prune.channel.targetMacs"},
           {R"({"steps":[{"prune":{"channel":{"amount":0.3,"targetMacs":0.5}}}]})", "amount or targetMacs"},
           {R"({"steps":[{"factorize":{"rankRatio":0.5,"energy":0.9}}]})", "steps[0].factorize"},
           {R"({"steps":[{"factorize":{"energy":1.5}}]})", "steps[0].factorize.energy"},
           {R"({"steps":[{"quantize":{"static":{"target":"arm"}}}]})", "steps[0].quantize.static.target"},
           {R"({"steps":[{"quantize":{"static":{"exclude":["fc",""]}}}]})",
            "steps[0].quantize.static.exclude[1]"},
           {R"({"steps":[{"quantize":{"static":{"exclude":["layer4..conv"]}}}]})",
            "steps[0].quantize.static.exclude[0]"},
           {R"({"steps":[{"quantize":{"static":{"exclude":["fc; rm"]}}}]})",
            "steps[0].quantize.static.exclude[0]"},
           {R"({"steps":[{"optimize":{}},{"finetune":{}}]})", "steps[0].optimize must be the last step"},
           {R"({"steps":[{"analyze":{"pruneAmounts":[0.5,1.0]}}]})", "steps[0].analyze.pruneAmounts[1]"},
           {R"({"steps":[{"analyze":{"maxLayers":-1}}]})", "steps[0].analyze.maxLayers"},
           {R"({"steps":[{"analyze":{"pruneAmounts":[0.5,0.5]}}]})",
            "steps[0].analyze.pruneAmounts[1] repeats"},
           {R"({"steps":[{"analyze":{"roundTo":999}}]})", "steps[0].analyze.roundTo"},
           {R"({"steps":[{"quantize":{"static":{"maxAccuracyDrop":-1}}}]})",
            "steps[0].quantize.static.maxAccuracyDrop"},
           {R"({"steps":[{"quantize":{"static":{"exclude":["fc","fc"]}}}]})",
            "steps[0].quantize.static.exclude[1] repeats"},
           {R"({"steps":[{"quantize":{"dynamic":{}}},{"optimize":{}}]})",
            "steps[1].optimize after steps[0] (quantize.dynamic): a quantized model is frozen already"},
           {R"({"steps":[{"prune":{"channel":{"amounts":{"layer4":1.5}}}}]})",
            "steps[0].prune.channel.amounts['layer4']"},
           {R"({"steps":[{"prune":{"channel":{"amounts":{"a b":0.5}}}}]})",
            "steps[0].prune.channel.amounts['a b']"},
           {R"({"steps":[{"prune":{"channel":{"targetMacs":0.5,"amounts":{"layer4":0.5}}}}]})",
            "amounts cannot be combined with targetMacs"},
           {R"({"steps":[{"prune":{"channel":{"scope":"GLOBAL","amounts":{"layer4":0.5}}}}]})",
            "amounts works with the UNIFORM scope"},
           {R"({"steps":[{"auto":{}}]})", "steps[0].auto.maxAccuracyDrop is required"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":-1}}]})", "steps[0].auto.maxAccuracyDrop"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":1,"objective":"SPEED"}}]})", "steps[0].auto.objective"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":1,"targetSpeedup":0.5}}]})",
            "steps[0].auto.targetSpeedup"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":1,"timeBudgetSeconds":100000}}]})",
            "steps[0].auto.timeBudgetSeconds"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":1,"methods":["prune.channel","pruning"]}}]})",
            "steps[0].auto.methods[1] 'pruning'"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":1,"methods":["optimize","optimize"]}}]})",
            "steps[0].auto.methods[1] repeats"},
           {R"({"steps":[{"auto":{"maxAccuracyDrop":1}},{"optimize":{}}]})",
            "steps[0].auto must be the recipe's only step"}}) {
    auto r = ToEngineSteps(ParseRecipeJson(json).value());
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << json;
    EXPECT_NE(r.status().message().find(field), std::string::npos) << r.status().message();
  }

  auto ok =
      ParseRecipeJson(R"({"steps":[{"prune":{"magnitude":{"amount":0.5,"scope":"GLOBAL","include":["fc"]}}},
                                         {"prune":{"nm":{"n":2,"m":4}}},{"quantize":{"dynamic":{}}}]})");
  ASSERT_TRUE(ok.ok());
  auto converted = ToEngineSteps(ok.value());
  ASSERT_TRUE(converted.ok()) << converted.status().ToString();
  ASSERT_EQ(converted->size(), 3u);
  auto& mag = std::get<engine::MagnitudePruneSpec>((*converted)[0]);
  EXPECT_TRUE(mag.global);
  EXPECT_EQ(mag.include, std::vector<std::string>{"fc"});

  auto bad_field = ParseRecipeJson(R"({"steps":[{"prune":{"magnitud":{}}}]})");
  EXPECT_EQ(bad_field.status().code(), Code::kInvalidArgument);
  EXPECT_NE(bad_field.status().message().find("magnitud"), std::string::npos);
  auto bad_scope = ToEngineSteps(
      ParseRecipeJson(R"({"steps":[{"prune":{"magnitude":{"amount":0.5,"scope":"ALL"}}}]})").value());
  EXPECT_NE(bad_scope.status().message().find("steps[0].prune.magnitude.scope"), std::string::npos);
  EXPECT_EQ(ToEngineSteps(v1::Recipe()).status().code(), Code::kInvalidArgument);
  auto bad_nm = ToEngineSteps(ParseRecipeJson(R"({"steps":[{"prune":{"nm":{"n":4,"m":4}}}]})").value());
  EXPECT_NE(bad_nm.status().message().find("steps[0].prune.nm.n"), std::string::npos);
  // A number no double holds is refused, not thrown (found by fuzz_recipe).
  auto huge = ParseRecipeJson(R"({"steps":[{"prune":{"magnitude":{"amount":1e999}}}]})");
  EXPECT_EQ(huge.status().code(), Code::kInvalidArgument);
  EXPECT_NE(huge.status().message().find("not valid JSON"), std::string::npos) << huge.status().message();
}

}  // namespace
}  // namespace pare::server
