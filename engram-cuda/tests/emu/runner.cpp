// Reads one launch (kernel name, grid, block, arguments) from argv[1], runs it on the
// emulator, and writes every buffer argument back, in order, to argv[2].
//
// Argument tags: 0 buffer (u64 bytes, data), 1 i32, 2 i64, 3 f32, 4 u64, 5 null pointer,
// 6 pointer table (u32 n, n x i32 buffer-argument index or -1: an array of addresses),
// 7 pointer into a buffer argument (u32 index, u64 byte offset).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

struct Arg {
    int tag = 0;
    std::vector<unsigned char> buf;  // tags 0 and 6
    uint64_t size = 0;               // tag 0: bytes to write back
    int64_t i = 0;
    float f = 0;
    uint64_t u = 0;
    std::vector<int> table;
    unsigned at_index = 0;
    uint64_t at_offset = 0;
};

template <class T>
static T rd(std::ifstream& in) {
    T v;
    in.read(reinterpret_cast<char*>(&v), sizeof v);
    return v;
}

static std::vector<Arg> args;

static void* addr(int k) {
    Arg& a = args[k];
    switch (a.tag) {
        case 0:
        case 6: return a.buf.data();
        case 5: return nullptr;
        case 7: return static_cast<unsigned char*>(addr((int)a.at_index)) + a.at_offset;
        default:
            std::cerr << "argument " << k << " is not a pointer\n";
            std::exit(3);
    }
}
template <class T>
static T* P(int k) { return static_cast<T*>(addr(k)); }
static int I32(int k) { return (int)args[k].i; }
static long long I64(int k) { return (long long)args[k].i; }
static float F32(int k) { return args[k].f; }
static unsigned long long U64(int k) { return args[k].u; }

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    std::ifstream in(argv[1], std::ios::binary);
    const uint32_t name_len = rd<uint32_t>(in);
    std::string name(name_len, '\0');
    in.read(name.data(), name_len);
    dim3 grid, block;
    grid.x = rd<uint32_t>(in);
    grid.y = rd<uint32_t>(in);
    block.x = rd<uint32_t>(in);
    block.y = rd<uint32_t>(in);
    const uint32_t n = rd<uint32_t>(in);
    args.resize(n);
    for (uint32_t k = 0; k < n; ++k) {
        Arg& a = args[k];
        a.tag = rd<uint8_t>(in);
        switch (a.tag) {
            case 0: {
                const uint64_t bytes = rd<uint64_t>(in);
                a.size = bytes;
                a.buf.resize(bytes ? bytes : 1);  // never empty: it has an address
                in.read(reinterpret_cast<char*>(a.buf.data()), (std::streamsize)bytes);
                break;
            }
            case 1: a.i = rd<int32_t>(in); break;
            case 2: a.i = rd<int64_t>(in); break;
            case 3: a.f = rd<float>(in); break;
            case 4: a.u = rd<uint64_t>(in); break;
            case 5: break;
            case 6: {
                const uint32_t m = rd<uint32_t>(in);
                for (uint32_t j = 0; j < m; ++j) a.table.push_back(rd<int32_t>(in));
                break;
            }
            case 7:
                a.at_index = rd<uint32_t>(in);
                a.at_offset = rd<uint64_t>(in);
                break;
            default: std::cerr << "bad tag\n"; return 3;
        }
    }
    if (!in) { std::cerr << "short input\n"; return 3; }
    // Pointer tables hold the addresses of buffers (after all are read: no reallocation).
    for (auto& a : args) {
        if (a.tag != 6) continue;
        a.buf.assign(8 * std::max<size_t>(a.table.size(), 1), 0);
        for (size_t j = 0; j < a.table.size(); ++j) {
            uint64_t p = a.table[j] < 0 ? 0 : (uint64_t)(uintptr_t)addr(a.table[j]);
            std::memcpy(a.buf.data() + 8 * j, &p, 8);
        }
    }
    auto go = [&](auto kernel) { emu_launch(grid, block, kernel); };
    if (name == "engram_gather_rows") {
        go([] { engram_gather_rows(P<const u8>(0), P<const u8>(1), P<const u8>(2), P<const u8>(3),
                                   P<const i64>(4), P<float>(5), I32(6), I32(7), I32(8), I64(9), I64(10)); });
    } else if (name == "engram_cache_insert") {
        go([] { engram_cache_insert(P<u8>(0), P<u8>(1), P<const u8>(2), P<const u8>(3), P<const i64>(4),
                                    I32(5), I64(6), I64(7)); });
    } else if (name == "engram_dequant_f8") {
        go([] { engram_dequant_f8(P<const u8>(0), P<const u8>(1), P<float>(2), I64(3), I32(4)); });
    } else if (name == "engram_paper_gate") {
        go([] { engram_paper_gate(P<const float>(0), P<const float>(1), P<const float>(2), P<const float>(3),
                                  P<const float>(4), P<const float>(5), P<float>(6), P<float>(7), I32(8), I32(9),
                                  I32(10), F32(11), F32(12), F32(13)); });
    } else if (name == "engram_v41_gate") {
        go([] { engram_v41_gate(P<const float>(0), P<const float>(1), P<const float>(2), P<const u8>(3),
                                P<float>(4), I32(5), I32(6), I32(7), F32(8), F32(9)); });
    } else if (name == "engram_short_conv") {
        go([] { engram_short_conv(P<const float>(0), P<const float>(1), P<const float>(2), P<const int>(3),
                                  P<const int>(4), P<const u64>(5), P<float>(6), I32(7), I32(8), I32(9), I32(10),
                                  I32(11)); });
    } else if (name == "engram_conv_window") {
        go([] { engram_conv_window(P<const float>(0), P<const u64>(1), P<const int>(2), P<const int>(3),
                                   P<float>(4), I32(5), I32(6), I32(7)); });
    } else if (name == "engram_store_windows") {
        go([] { engram_store_windows(P<const float>(0), P<const u64>(1), I32(2), I32(3), I32(4)); });
    } else if (name == "engram_sgemm_nt") {
        go([] { engram_sgemm_nt(P<const float>(0), P<const float>(1), P<float>(2), I32(3), I32(4), I32(5)); });
    } else if (name == "engram_spin") {
        go([] { engram_spin(U64(0)); });
    } else {
        std::cerr << "unknown kernel " << name << "\n";
        return 3;
    }
    std::ofstream out(argv[2], std::ios::binary);
    for (auto& a : args) {
        if (a.tag == 0) out.write(reinterpret_cast<const char*>(a.buf.data()), (std::streamsize)a.size);
    }
    return out ? 0 : 4;
}
