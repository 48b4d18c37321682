package dev.gemmaaot.core

import java.io.File
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * Checks a `.litertlm` bundle before the engine sees it: the engine crashes or fails obscurely on
 * a truncated or foreign file, the app should say what is wrong instead.
 *
 * The format, as `litert-lm-builder` writes it: "LITERTLM" magic, major/minor/patch u32 at 8..20,
 * the header's end offset u64 at 24, then a flatbuffer `LiteRTLMMetaData` from byte 32 holding the
 * system metadata and a list of sections (items, begin and end offsets, data type). Sections
 * follow, aligned to 16 KiB. An LLM bundle needs a TFLite model, a tokenizer and LlmMetadata.
 */
object LitertlmFile {
    const val MAGIC = "LITERTLM"
    const val SUPPORTED_MAJOR = 1

    /** AnySectionDataType in the header schema. */
    val SECTION_TYPES = mapOf(
        0 to "NONE", 1 to "GenericBinaryData", 2 to "Deprecated", 3 to "TFLiteModel",
        4 to "SP_Tokenizer", 5 to "LlmMetadataProto", 6 to "HF_Tokenizer_Zlib",
        7 to "TFLiteWeights", 8 to "EmbeddingMetadataProto", 9 to "ExecutorMetadataProto",
        10 to "TtsMetadataProto", 11 to "AsrMetadataProto")

    data class Section(val type: String, val begin: Long, val end: Long,
                       val items: Map<String, String>)

    sealed class Check {
        data class Ok(val version: String, val sections: List<Section>,
                      val system: Map<String, String>, val bytes: Long) : Check() {
            /** e.g. "model_type" of the TFLite section ("tf_lite_prefill_decode"). */
            fun section(type: String) = sections.firstOrNull { it.type == type }
        }
        data class Invalid(val reason: String) : Check()
    }

    fun check(file: File): Check {
        if (!file.exists()) return Check.Invalid("no file at ${file.path}")
        if (!file.isFile) return Check.Invalid("${file.path} is not a file")
        val size = file.length()
        if (size < 32) return Check.Invalid(
            "${file.name} is $size bytes, too short for a .litertlm file (corrupt or incomplete copy)")
        RandomAccessFile(file, "r").use { raf ->
            val head = ByteArray(32).also { raf.readFully(it) }
            val magic = String(head, 0, 8, Charsets.ISO_8859_1)
            if (magic != MAGIC) {
                val hint = if (String(head, 4, 4, Charsets.ISO_8859_1) == "TFL3")
                    " (it is a bare .tflite model: push the .litertlm bundle instead)" else ""
                return Check.Invalid("${file.name} is not a .litertlm file: it starts with " +
                    "'${printable(head, 8)}', not '$MAGIC'$hint")
            }
            val b = ByteBuffer.wrap(head).order(ByteOrder.LITTLE_ENDIAN)
            val major = b.getInt(8); val minor = b.getInt(12); val patch = b.getInt(16)
            val version = "$major.$minor.$patch"
            if (major != SUPPORTED_MAJOR) return Check.Invalid(
                "${file.name} is .litertlm format $version; this app reads $SUPPORTED_MAJOR.x")
            val headerEnd = b.getLong(24)
            if (headerEnd <= 32 || headerEnd > size) return Check.Invalid(
                "${file.name}: header ends at byte $headerEnd, the file has $size bytes (truncated)")
            if (headerEnd - 32 > 64L * 1024 * 1024) return Check.Invalid(
                "${file.name}: header of ${headerEnd - 32} bytes is implausible (corrupt)")
            val header = ByteArray((headerEnd - 32).toInt())
            raf.seek(32)
            raf.readFully(header)
            val parsed = try {
                parseHeader(ByteBuffer.wrap(header).order(ByteOrder.LITTLE_ENDIAN))
            } catch (e: IndexOutOfBoundsException) {
                return Check.Invalid("${file.name}: the header is corrupt (${e.message})")
            } catch (e: IllegalArgumentException) {
                return Check.Invalid("${file.name}: the header is corrupt (${e.message})")
            }
            val (system, sections) = parsed
            for (s in sections) {
                if (s.begin < headerEnd || s.end < s.begin || s.end > size) return Check.Invalid(
                    "${file.name}: section ${s.type} spans bytes ${s.begin}..${s.end}, the file " +
                        "has $size bytes (truncated or corrupt)")
            }
            val types = sections.map { it.type }.toSet()
            val missing = buildList {
                if ("TFLiteModel" !in types) add("TFLiteModel")
                if ("SP_Tokenizer" !in types && "HF_Tokenizer_Zlib" !in types) add("tokenizer")
                if ("LlmMetadataProto" !in types) add("LlmMetadataProto")
            }
            if (missing.isNotEmpty()) return Check.Invalid(
                "${file.name} lacks what a language model bundle needs: ${missing.joinToString()} " +
                    "(sections present: ${types.joinToString()})")
            return Check.Ok(version, sections, system, size)
        }
    }

    private fun printable(b: ByteArray, n: Int) = (0 until n).joinToString("") {
        val c = b[it].toInt() and 0xff
        if (c in 0x20..0x7e) c.toChar().toString() else "\\x%02x".format(c)
    }

    // --- a minimal flatbuffers reader for the header schema ---

    private class Table(val buf: ByteBuffer, val pos: Int) {
        private val vtable = pos - buf.getInt(pos)
        private val vtableSize = buf.getShort(vtable).toInt() and 0xffff

        /** Absolute position of field [id], or -1 when absent. */
        fun field(id: Int): Int {
            val at = 4 + 2 * id
            if (at >= vtableSize) return -1
            val off = buf.getShort(vtable + at).toInt() and 0xffff
            return if (off == 0) -1 else pos + off
        }

        fun table(id: Int): Table? = field(id).takeIf { it >= 0 }?.let { Table(buf, deref(it)) }
        fun u8(id: Int): Int = field(id).takeIf { it >= 0 }?.let { buf.get(it).toInt() and 0xff } ?: 0
        fun u64(id: Int): Long = field(id).takeIf { it >= 0 }?.let { buf.getLong(it) } ?: 0L
        fun string(id: Int): String? = field(id).takeIf { it >= 0 }?.let { str(deref(it)) }
        fun tables(id: Int): List<Table> {
            val f = field(id).takeIf { it >= 0 } ?: return emptyList()
            val vec = deref(f)
            val n = buf.getInt(vec)
            require(n in 0..100_000) { "vector of $n entries" }
            return (0 until n).map { Table(buf, deref(vec + 4 + 4 * it)) }
        }

        private fun deref(at: Int) = at + buf.getInt(at)
        private fun str(at: Int): String {
            val n = buf.getInt(at)
            require(n in 0..(buf.limit() - at - 4)) { "string of $n bytes" }
            return String(ByteArray(n) { buf.get(at + 4 + it) }, Charsets.UTF_8)
        }
    }

    private fun keyValues(items: List<Table>): Map<String, String> = items.associate { kv ->
        val key = kv.string(0) ?: ""
        val value = kv.table(2)
        key to when (kv.u8(1)) {                       // VData union type
            0 -> ""
            1 -> value?.u8(0).toString()                                       // UInt8
            2 -> value?.field(0)?.takeIf { it >= 0 }?.let { value.buf.get(it).toString() } ?: "0"
            3, 4 -> value?.field(0)?.takeIf { it >= 0 }?.let { value.buf.getShort(it).toString() } ?: "0"
            5, 6 -> value?.field(0)?.takeIf { it >= 0 }?.let { value.buf.getInt(it).toString() } ?: "0"
            7 -> value?.field(0)?.takeIf { it >= 0 }?.let { value.buf.getFloat(it).toString() } ?: "0.0"
            8 -> (value?.u8(0) == 1).toString()
            9 -> value?.string(0) ?: ""
            10, 11 -> value?.u64(0).toString()
            12 -> value?.field(0)?.takeIf { it >= 0 }?.let { value.buf.getDouble(it).toString() } ?: "0.0"
            else -> "?"
        }
    }

    private fun parseHeader(buf: ByteBuffer): Pair<Map<String, String>, List<Section>> {
        val root = Table(buf, buf.getInt(0))
        val system = root.table(0)?.let { keyValues(it.tables(0)) } ?: emptyMap()
        val sections = root.table(1)?.tables(0).orEmpty().map { s ->
            Section(SECTION_TYPES[s.u8(3)] ?: "unknown(${s.u8(3)})", s.u64(1), s.u64(2),
                    keyValues(s.tables(0)))
        }
        return system to sections
    }
}
