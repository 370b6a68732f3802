// The build uses the pinned wheel's LibTorch, and only it: the headers say
// the pinned version, and every LibTorch library loaded in this process comes
// from the wheel (never Debian's /usr/lib libc10.so or libtorch*.so, which a
// machine with libtorch-dev also has). tests/header_origin_test.sh checks the
// same for the headers each object file was compiled from.

#include <gtest/gtest.h>

#include <link.h>
#include <torch/headeronly/version.h>

#include <string>
#include <vector>

namespace {

std::vector<std::string> loaded_objects() {
  std::vector<std::string> paths;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        if (info->dlpi_name != nullptr && *info->dlpi_name != '\0') {
          static_cast<std::vector<std::string>*>(out)->push_back(info->dlpi_name);
        }
        return 0;
      },
      &paths);
  return paths;
}

bool is_libtorch(const std::string& path) {
  const std::string name = path.substr(path.rfind('/') + 1);
  return name.rfind("libc10", 0) == 0 || name.rfind("libtorch", 0) == 0;
}

TEST(TorchBuild, HeadersAreThePinnedVersion) { EXPECT_STREQ(TORCH_VERSION, FSDPSIM_TORCH_PIN); }

TEST(TorchBuild, EveryLoadedLibTorchLibraryIsTheWheels) {
  const std::string wheel_lib = std::string(FSDPSIM_TORCH_ROOT) + "/lib/";
  int from_wheel = 0;
  for (const std::string& path : loaded_objects()) {
    if (!is_libtorch(path)) continue;
    EXPECT_EQ(path.rfind(wheel_lib, 0), 0u) << path << " is loaded from outside " << wheel_lib;
    ++from_wheel;
  }
  EXPECT_GE(from_wheel, 2) << "expected libc10.so and libtorch_cpu.so among the loaded objects";
}

}  // namespace
